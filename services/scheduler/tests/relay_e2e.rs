//! Relays end to end (ADR 0015): a real nats-server, a real gateway, the real scheduler, a
//! real relay agent and real downstream agents (the agent library over real sockets).
//! Downstreams register through the relay with their own tokens, run tasks, replay their
//! outbox after the relay restarts, fail over when it dies and take tunnels, also through a
//! relay's unix socket file; a relay that tampers with a downstream's bytes or tries to
//! register in its name gets nowhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::http;
use testkit::tls::TestCa;
use testkit::ws::token;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "relay-e2e-api-key-0123456789";

async fn eventually(
    addr: SocketAddr,
    path: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    http::eventually(addr, path, KEY, check).await
}

/// An agent config: `gateways` are full URLs; `extra` adds top-level TOML lines.
fn agent_config(dir: &Path, node: &str, gateways: &[String], extra: &str) -> agent::AgentConfig {
    let text = AgentToml::new(node)
        .gateways(gateways)
        .line(r#"allowed_commands = ["echo", "sh"]"#)
        .line(extra)
        .label("site", "berlin")
        .render(dir);
    agent::AgentConfig::from_toml(&text, &dir.join(format!("{node}.toml")), |_| None).unwrap()
}

/// NATS, one gateway (optionally TLS) and the scheduler.
struct Fleet {
    _nats: NatsServer,
    /// `None` once a test took it to shut it down.
    gateway: Option<ws_gateway::Handle>,
    sched: scheduler::Handle,
    dir: tempfile::TempDir,
    /// `ws://` or `wss://` URL of the gateway.
    url: String,
    /// The agents' `tls_ca_file` line when the gateway speaks TLS.
    tls_line: String,
}

impl Fleet {
    async fn start(name: &str, tls: bool) -> Fleet {
        Fleet::start_with(name, tls, None).await
    }

    /// With the gateway's drain window set to `drain`.
    async fn start_with(name: &str, tls: bool, drain: Option<Duration>) -> Fleet {
        let nats = NatsServer::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = testkit::gateway::config(&nats.url(), name);
        if let Some(drain) = drain {
            config.drain_window = drain;
        }
        // Plain ws:// through a relay must be allowed explicitly (one machine, a test).
        let mut tls_line = "insecure_relay = true".to_owned();
        if tls {
            let ca = TestCa::new("relay test CA");
            let ca_file = ca.write(&dir.path().join("ca.pem"));
            let (cert, key) = ca.server_cert().write(dir.path(), "gw");
            config.tls = Some(servicekit::tls::ReloadableCert::load(&cert, &key).unwrap());
            tls_line = format!("tls_ca_file = {:?}", ca_file.display().to_string());
        }
        let gateway = if tls {
            // The fixture's readiness probe speaks plain HTTP; agents retry until it is up.
            ws_gateway::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap()
        } else {
            testkit::gateway::start(config).await
        };
        let scheme = if tls { "wss" } else { "ws" };
        let url = format!("{scheme}://127.0.0.1:{}/ws", gateway.addr().port());
        let mut sc = scheduler::Config::new(
            nats.url(),
            vec![KEY.to_owned()],
            dir.path().join("scheduler.redb"),
        );
        sc.api_keys = scheduler::auth::parse_keys(&format!("ops:operator:{KEY}")).unwrap();
        sc.command_key = Arc::new(
            messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap(),
        );
        let sched = scheduler::spawn(sc, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        http::wait_status(sched.addr(), "/readyz", 200).await;
        Fleet {
            _nats: nats,
            gateway: Some(gateway),
            sched,
            dir,
            url,
            tls_line,
        }
    }

    /// A relay agent listening on `listen` (port 0: any).
    async fn relay(&self, node: &str, listen: &str) -> agent::AgentHandle {
        let extra = format!("relay_listen = \"{listen}\"\n{}", self.tls_line);
        let config = agent_config(
            self.dir.path(),
            node,
            std::slice::from_ref(&self.url),
            &extra,
        );
        agent::start(config).await.unwrap()
    }

    /// The gateway URL reached through the relay at `relay`.
    fn via(&self, relay: SocketAddr) -> String {
        format!("{}?via={relay}", self.url)
    }

    async fn agent(&self, node: &str, gateways: &[String]) -> agent::AgentHandle {
        self.agent_with(node, gateways, "").await
    }

    async fn agent_with(&self, node: &str, gateways: &[String], extra: &str) -> agent::AgentHandle {
        let extra = format!("{extra}\n{}", self.tls_line);
        let config = agent_config(self.dir.path(), node, gateways, &extra);
        agent::start(config).await.unwrap()
    }

    /// Waits until `node` is online and tagged with the relay it came through (every node
    /// here comes through one; the tag may follow the connect event, handled on another
    /// subscription just after the register).
    async fn online(&self, node: &str) -> serde_json::Value {
        eventually(self.sched.addr(), &format!("/v1/agents/{node}"), |v| {
            v["state"] == "online" && v["via"].is_string()
        })
        .await
    }

    async fn gateway_metric(&self, name: &str) -> f64 {
        let r = http::get(self.gw().addr(), "/metrics", "").await.unwrap();
        let text = String::from_utf8_lossy(&r.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }

    async fn task(&self, nodes: &[&str], argv: &[&str]) -> String {
        let r = http::post_json(
            self.sched.addr(),
            "/v1/tasks",
            KEY,
            &json!({"targets": {"nodes": nodes}, "spec": {"kind": "command", "argv": argv}, "timeout_ms": 20000}),
        )
        .await
        .unwrap();
        assert!(r.status < 300, "{:?}", r.json());
        let v = r.json();
        v["task_id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v["task_id"].to_string())
    }

    fn gw(&self) -> &ws_gateway::Handle {
        self.gateway.as_ref().unwrap()
    }

    async fn stop(self) {
        self.sched.shutdown().await.unwrap();
        if let Some(gateway) = self.gateway {
            gateway.shutdown().await.unwrap();
        }
    }
}

async fn stop(mut agent: agent::AgentHandle) {
    agent.stop();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.join()).await;
}

#[tokio::test]
async fn downstreams_behind_a_relay_register_with_their_own_identity_and_run_tasks() {
    let fleet = Fleet::start("gw-relay-1", false).await;
    let relay = fleet.relay("relay-1", "127.0.0.1:0").await;
    let via = fleet.via(relay.relay_addr().unwrap());
    let echo = echo_server().await;
    let a = fleet
        .agent_with(
            "down-a",
            std::slice::from_ref(&via),
            &format!("tunnel_allow = [\"{echo}\"]"),
        )
        .await;
    let b = fleet.agent("down-b", std::slice::from_ref(&via)).await;

    // Each downstream is its own node, registered with its own token, tagged with the relay.
    for node in ["down-a", "down-b"] {
        let v = fleet.online(node).await;
        assert_eq!(v["via"], "relay-1", "{v}");
    }
    // The relay's own session goes through its own listener too: one gateway socket.
    let v = fleet.online("relay-1").await;
    assert_eq!(v["via"], "relay-1", "{v}");
    assert_eq!(fleet.gateway_metric("ws_gateway_relays").await, 1.0);
    assert_eq!(fleet.gateway_metric("ws_gateway_relay_streams").await, 3.0);

    let id = fleet
        .task(&["down-a", "down-b"], &["sh", "-c", "echo from $0", "x"])
        .await;
    let v = eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-a"]["state"] == "succeeded"
            && v["targets"]["down-b"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(v["results"].as_array().map(Vec::len), Some(2), "{v}");

    // A tunnel to a port on a downstream's machine rides on its own session.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/v1/agents/down-a/tunnel?remote={echo}",
            fleet.sched.addr()
        ))
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut tunnel, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    tunnel
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            b"through the relay".to_vec().into(),
        ))
        .await
        .unwrap();
    let mut echoed = Vec::new();
    while echoed.len() < 17 {
        match tokio::time::timeout(Duration::from_secs(10), tunnel.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b)))) => {
                echoed.extend_from_slice(&b);
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("reading the tunnel: {other:?}"),
        }
    }
    assert_eq!(echoed, b"through the relay");
    let _ = tunnel.close(None).await;

    // A relay connection is refused for app tokens and through another relay.
    let app = token("someone", None, &[]);
    let refused = tokio_tungstenite::connect_async(
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/relay?token={app}",
            fleet.gw().addr()
        ))
        .unwrap(),
    )
    .await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403),
        "{refused:?}"
    );
    let nested = relay_handshake_status(
        relay.relay_addr().unwrap(),
        &token("relay-2", Some("agent"), &[]),
    )
    .await;
    assert!(nested.contains(" 403 "), "{nested}");

    for agent in [a, b, relay] {
        stop(agent).await;
    }
    fleet.stop().await;
}

/// A relay listening on a unix socket file, over TLS: the downstream does TLS with the
/// gateway's name and its upgrade through the socket, registers as itself, and runs a task
/// from the real scheduler; the relay's own session goes through the socket as well.
#[tokio::test]
async fn a_downstream_behind_a_unix_socket_relay_runs_tasks_over_tls() {
    let fleet = Fleet::start("gw-relay-unix", true).await;
    let socket = fleet.dir.path().join("relay.sock");
    let relay = fleet
        .relay("relay-u", &format!("unix:{}", socket.display()))
        .await;
    assert_eq!(relay.relay_addr(), None);
    let via = format!("{}?via=unix:{}", fleet.url, socket.display());
    assert!(via.starts_with("wss://"), "{via}");
    let down = fleet.agent("down-u", std::slice::from_ref(&via)).await;

    // Both tagged with the relay: the relay's own session came through its socket too.
    for node in ["down-u", "relay-u"] {
        let v = fleet.online(node).await;
        assert_eq!(v["via"], "relay-u", "{v}");
    }

    let id = fleet
        .task(&["down-u", "relay-u"], &["sh", "-c", "echo from $0", "x"])
        .await;
    eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-u"]["state"] == "succeeded"
            && v["targets"]["relay-u"]["state"] == "succeeded"
    })
    .await;

    stop(down).await;
    stop(relay).await;
    assert!(!socket.exists(), "the relay removed its socket file");
    fleet.stop().await;
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

/// Sends a `/relay` upgrade through the relay at `relay` (plain HTTP over the stream) and
/// returns the gateway's status line.
async fn relay_handshake_status(relay: SocketAddr, token: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(relay).await.unwrap();
    let request = format!(
        "GET /relay HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn outbox_replays_after_the_relay_restarts_and_downstreams_fail_over_when_it_dies() {
    let fleet = Fleet::start("gw-relay-2", false).await;
    let relay1 = fleet.relay("relay-1", "127.0.0.1:0").await;
    let addr1 = relay1.relay_addr().unwrap();
    let relay2 = fleet.relay("relay-2", "127.0.0.1:0").await;
    let addr2 = relay2.relay_addr().unwrap();
    let down = fleet.agent("down-r", &[fleet.via(addr1)]).await;
    fleet.online("down-r").await;

    // A result finishes while the relay is down: it waits in the outbox and is replayed
    // once the relay is back on the same address.
    let id = fleet
        .task(&["down-r"], &["sh", "-c", "sleep 2; echo survived"])
        .await;
    eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-r"]["state"] == "running"
    })
    .await;
    stop(relay1).await;
    eventually(fleet.sched.addr(), "/v1/agents/down-r", |v| {
        v["state"] != "online"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        down.outbox().len().unwrap() >= 1,
        "the result waits in the outbox"
    );
    let relay1 = fleet.relay("relay-1", &addr1.to_string()).await;
    let v = eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-r"]["state"] == "succeeded"
    })
    .await;
    assert!(
        v["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("survived"),
        "{v}"
    );
    stop(down).await;

    // Failover: a downstream that lists two relays moves to the other when one is killed.
    let moving = fleet
        .agent("down-f", &[fleet.via(addr1), fleet.via(addr2)])
        .await;
    let v = fleet.online("down-f").await;
    let first = v["via"].as_str().unwrap().to_owned();
    let (dying, survivor) = if first == "relay-1" {
        (relay1, ("relay-2", relay2))
    } else {
        (relay2, ("relay-1", relay1))
    };
    stop(dying).await;
    eventually(fleet.sched.addr(), "/v1/agents/down-f", |v| {
        v["state"] == "online" && v["via"] == survivor.0
    })
    .await;
    let id = fleet.task(&["down-f"], &["echo", "moved"]).await;
    eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-f"]["state"] == "succeeded"
    })
    .await;
    stop(moving).await;
    stop(survivor.1).await;
    fleet.stop().await;
}

/// A relay that flips a byte of what a downstream sends once `tamper` is set; otherwise it
/// is an honest relay (the same mux the agent uses, on `/relay` with its own token).
async fn tampering_relay(
    gateway: SocketAddr,
    ca: &Path,
    node: &str,
    tamper: Arc<AtomicBool>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = Arc::new(
        servicekit::tls::client_config(servicekit::tls::roots_from_file(ca).unwrap(), &[]).unwrap(),
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "wss://127.0.0.1:{}/relay",
            gateway.port()
        ))
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(node, Some("agent"), &[]))
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    )
    .await
    .unwrap();
    let (mux, mut frames) = servicekit::mux::Mux::new(false, 64);
    let (mut tx, mut rx) = ws.split();
    tokio::spawn(async move {
        while let Some(f) = frames.recv().await {
            if tx
                .send(tokio_tungstenite::tungstenite::Message::Binary(f.into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let m = mux.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            if let tokio_tungstenite::tungstenite::Message::Binary(b) = msg {
                let _ = m.on_frame(&b);
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let stream = mux.open().unwrap();
            let tamper = Arc::clone(&tamper);
            tokio::spawn(async move {
                let (mut tcp_r, mut tcp_w) = tcp.into_split();
                let (mut up_r, mut up_w) = tokio::io::split(stream);
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut up_r, &mut tcp_w).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match tcp_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if tamper.load(Ordering::Relaxed) {
                        // One bit of the last byte: inside a TLS record's ciphertext or tag.
                        buf[n - 1] ^= 0x01;
                    }
                    if up_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_relay_cannot_alter_a_downstreams_traffic_or_register_in_its_name() {
    let fleet = Fleet::start("gw-relay-3", true).await;
    let ca = fleet.dir.path().join("ca.pem");
    let tamper = Arc::new(AtomicBool::new(false));
    let evil = {
        // The gateway may still be starting (no plain readiness probe with TLS).
        let mut tries = 0;
        loop {
            let gw = fleet.gw().addr();
            let ca = ca.clone();
            let tamper = Arc::clone(&tamper);
            match tokio::spawn(async move { tampering_relay(gw, &ca, "relay-evil", tamper).await })
                .await
            {
                Ok(addr) => break addr,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 50, "the relay never connected: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    let down = fleet.agent("down-t", &[fleet.via(evil)]).await;
    let v = fleet.online("down-t").await;
    assert_eq!(v["via"], "relay-evil", "{v}");

    // While the relay alters bytes, TLS at the gateway refuses them: the session dies, the
    // result is not stored, and no new session gets through.
    let id = fleet
        .task(&["down-t"], &["sh", "-c", "sleep 1; echo genuine"])
        .await;
    tamper.store(true, Ordering::Relaxed);
    eventually(fleet.sched.addr(), "/v1/agents/down-t", |v| {
        v["state"] != "online"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = http::get(fleet.sched.addr(), &format!("/v1/tasks/{id}"), KEY)
        .await
        .unwrap()
        .json();
    assert_ne!(r["targets"]["down-t"]["state"], "succeeded", "{r}");
    assert_eq!(r["results"].as_array().map_or(0, Vec::len), 0, "{r}");
    let a = http::get(fleet.sched.addr(), "/v1/agents/down-t", KEY)
        .await
        .unwrap()
        .json();
    assert_ne!(a["state"], "online", "{a}");

    // Once the relay forwards honestly the downstream's own outbox delivers the genuine
    // result, exactly once.
    tamper.store(false, Ordering::Relaxed);
    let v = eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-t"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(v["results"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        v["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap()
            .trim(),
        "genuine"
    );

    // The relay holds no downstream credential: an upgrade it makes itself in the name of
    // a downstream has only its own token (or none), so the node is never its to register.
    let forged = forged_register(evil, &ca).await;
    assert!(forged.contains(" 401 "), "{forged}");
    let ghost = http::get(fleet.sched.addr(), "/v1/agents/ghost-node", KEY)
        .await
        .unwrap();
    assert_eq!(ghost.status, 404);

    stop(down).await;
    fleet.stop().await;
}

/// Through the relay at `relay`, opens TLS to the gateway and sends a `/ws` upgrade with
/// no downstream token (all a relay has); returns the status line.
async fn forged_register(relay: SocketAddr, ca: &Path) -> String {
    let tls = Arc::new(
        servicekit::tls::client_config(servicekit::tls::roots_from_file(ca).unwrap(), &[]).unwrap(),
    );
    let connector = tokio_rustls::TlsConnector::from(tls);
    let tcp = tokio::net::TcpStream::connect(relay).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut io = connector.connect(name, tcp).await.unwrap();
    let request = "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         X-Node: ghost-node\r\n\r\n";
    io.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A gauge or counter from a gateway's `/metrics` (NaN when absent or unreachable).
async fn metric(gateway: SocketAddr, name: &str) -> f64 {
    let Ok(r) = http::get(gateway, "/metrics", "").await else {
        return f64::NAN;
    };
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn revoking_a_relay_closes_its_relay_connection_and_its_downstreams_move() {
    let fleet = Fleet::start("gw-relay-revoke", false).await;
    let relay1 = fleet.relay("relay-v1", "127.0.0.1:0").await;
    let addr1 = relay1.relay_addr().unwrap();
    let relay2 = fleet.relay("relay-v2", "127.0.0.1:0").await;
    let addr2 = relay2.relay_addr().unwrap();
    fleet.online("relay-v1").await;
    fleet.online("relay-v2").await;
    let down = fleet
        .agent("down-v", &[fleet.via(addr1), fleet.via(addr2)])
        .await;
    let first = fleet.online("down-v").await["via"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = if first == "relay-v1" {
        "relay-v2"
    } else {
        "relay-v1"
    };
    let r = http::post_json(
        fleet.sched.addr(),
        &format!("/v1/agents/{first}/revoke"),
        KEY,
        &json!({}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    // Not only the relay's own session goes: its relay connection is closed too, so the
    // downstream it carried moves to the other relay (before this, it stayed until the
    // revoked relay's token expired).
    eventually(fleet.sched.addr(), "/v1/agents/down-v", |v| {
        v["state"] == "online" && v["via"] == other
    })
    .await;
    let id = fleet.task(&["down-v"], &["echo", "moved"]).await;
    eventually(fleet.sched.addr(), &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["down-v"]["state"] == "succeeded"
    })
    .await;
    stop(down).await;
    stop(relay1).await;
    stop(relay2).await;
    fleet.stop().await;
}

#[tokio::test]
async fn a_relay_moves_to_another_gateway_when_its_gateway_drains() {
    // Drain windows long enough that a relay stuck on the draining gateway would show.
    let mut fleet =
        Fleet::start_with("gw-relay-drain-a", false, Some(Duration::from_secs(20))).await;
    let mut config = testkit::gateway::config(&fleet._nats.url(), "gw-relay-drain-b");
    config.drain_window = Duration::from_secs(20);
    let mut other = Some(testkit::gateway::start(config).await);
    let other_addr = other.as_ref().unwrap().addr();
    let urls = [fleet.url.clone(), format!("ws://{other_addr}/ws")];
    let relay = agent_config(
        fleet.dir.path(),
        "relay-d",
        &urls,
        "relay_listen = \"127.0.0.1:0\"",
    );
    let relay = agent::start(relay).await.unwrap();
    let down = fleet
        .agent("down-d", &[fleet.via(relay.relay_addr().unwrap())])
        .await;
    fleet.online("down-d").await;
    let home = fleet.gw().addr();
    let on_home = metric(home, "ws_gateway_relays").await == 1.0;
    let (draining, target) = if on_home {
        (fleet.gateway.take().unwrap(), other_addr)
    } else {
        (other.take().unwrap(), home)
    };
    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(draining.shutdown());
    // The relay connection moves to the other gateway once the draining one stops.
    while metric(target, "ws_gateway_relays").await != 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the relay stayed on the draining gateway"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The sessions it carried come back through it after the reconnect delay the draining
    // gateway gave each (spread over its window).
    let give_up = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        let r = http::get(fleet.sched.addr(), "/v1/agents/down-d", KEY).await;
        if r.is_ok_and(|r| r.json()["state"] == "online")
            && metric(target, "ws_gateway_relay_streams").await >= 2.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "down-d never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = shutdown.await;
    stop(down).await;
    stop(relay).await;
    if let Some(other) = other {
        other.shutdown().await.unwrap();
    }
    fleet.stop().await;
}
