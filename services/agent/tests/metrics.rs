//! The agent's Prometheus endpoint over real sockets, with a real nats-server and a real
//! gateway: `/metrics` follows the session (connected, sessions, heartbeats, tasks,
//! results, acks, reconnects), bad requests get 4xx without hurting the endpoint, and the
//! endpoint goes away with the agent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use agent::AgentConfig;
use messages::envelope::PushEnvelope;
use messages::fleet::{self, Ack, Task, TaskKind};
use messages::payload::to_bus;
use messages::{BodyCodec, Route};
use testkit::NatsServer;
use testkit::agent::AgentToml;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(15);

async fn gateway(nats: &str) -> ws_gateway::Handle {
    testkit::gateway::start(testkit::gateway::config(nats, "gw-m")).await
}

fn agent_config(dir: &Path, gateway: SocketAddr) -> AgentConfig {
    let text = AgentToml::new("node-1")
        .gateway(format!("ws://{gateway}/ws"))
        .outbox("outbox.redb")
        .line(r#"allowed_commands = ["echo"]"#)
        .line("heartbeat_secs = 1")
        .line(r#"metrics_listen = "127.0.0.1:0""#)
        .render(dir);
    AgentConfig::from_toml(&text, &dir.join("agent.toml"), |_| None).unwrap()
}

/// Sends raw bytes and returns the whole response (the endpoint closes after one).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response within the wait")
        .unwrap();
    String::from_utf8(out).unwrap()
}

/// The body of `GET /metrics`, after checking the status and content type.
async fn scrape(addr: SocketAddr) -> String {
    let r = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n").await;
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `series` (name plus any labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `check` accepts the text; returns it. Fails after [`WAIT`] with the last one.
async fn eventually(addr: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await;
        if check(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {what}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pushes to node-1 the way the scheduler does.
async fn push(nats: &async_nats::Client, msg_id: u64, route: &str, body: Vec<u8>) {
    let signer = messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (body, _) = signer.sign("node-1", route, body, now, 60_000).unwrap();
    let push = PushEnvelope::new(msg_id, Route::new(route).unwrap(), BodyCodec::MsgPack);
    nats.publish_with_headers("ws.agent.node-1", push.to_headers(), body.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_session_and_survive_bad_requests() {
    let nats = NatsServer::start().unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let gw = gateway(&nats.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config(dir.path(), gw.addr()))
        .await
        .unwrap();
    let addr = agent.metrics_addr().expect("metrics_listen is set");
    assert_ne!(addr.port(), 0, "the bound port is reported");

    // Connected once welcomed; the session is counted and heartbeats flow.
    let text = eventually(addr, "agent_connected 1 and a heartbeat", |t| {
        sample(t, "agent_connected") == Some(1)
            && sample(t, "agent_heartbeats_sent_total").is_some_and(|n| n >= 1)
    })
    .await;
    assert_eq!(sample(&text, "agent_sessions_total"), Some(1), "{text}");
    assert_eq!(sample(&text, "agent_reconnects_total"), Some(0), "{text}");
    assert!(sample(&text, "agent_outbox_entries").is_some(), "{text}");
    assert!(text.contains("# TYPE agent_connected gauge\n"), "{text}");
    assert!(
        text.contains("# TYPE agent_tasks_finished counter\n"),
        "{text}"
    );
    assert!(agent.metrics().connected());

    // Bad requests get 4xx answers, and the endpoint keeps serving.
    let r = raw(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    let r = raw(addr, b"this is not http\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let r = raw(addr, b"\x00\xff\xfe\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let r = raw(addr, huge.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    // A client that sends half a request and leaves.
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /met").await.unwrap();
    }
    let health = testkit::http::request(addr, "GET", "/healthz", &[], b"")
        .await
        .unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.body, b"ok\n");
    let r = testkit::http::request(addr, "POST", "/metrics", &[], b"x")
        .await
        .unwrap();
    assert_eq!(r.status, 405);

    // A task: started, finished with its outcome, its result sent; then an ack push.
    let task = Task {
        task_id: 1,
        attempt: 1,
        spec: TaskKind::Command {
            argv: vec!["echo".to_owned(), "hi".to_owned()],
            env: Default::default(),
            cwd: None,
        },
        timeout_ms: 10_000,
    };
    push(&client, 1, fleet::down::TASK, to_bus(&task).unwrap()).await;
    let text = eventually(addr, "the task's result sent", |t| {
        sample(t, "agent_results_sent_total").is_some_and(|n| n >= 1)
    })
    .await;
    assert_eq!(
        sample(&text, "agent_tasks_started_total"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(&text, "agent_tasks_finished_total{outcome=\"succeeded\"}"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        sample(&text, "agent_tasks_finished_total{outcome=\"failed\"}"),
        Some(0),
        "{text}"
    );
    let ack = Ack {
        message_ids: vec!["not-ours".to_owned()],
    };
    push(&client, 2, fleet::down::ACK, to_bus(&ack).unwrap()).await;
    eventually(addr, "the ack counted", |t| {
        sample(t, "agent_acks_received_total") == Some(1)
    })
    .await;

    // The gateway goes away: disconnected, and the retry is counted.
    gw.shutdown().await.unwrap();
    eventually(addr, "agent_connected 0 and a reconnect", |t| {
        sample(t, "agent_connected") == Some(0)
            && sample(t, "agent_reconnects_total").is_some_and(|n| n >= 1)
    })
    .await;

    // The endpoint stops with the agent.
    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "endpoint closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_refuses_to_start_with_a_config_exit_code() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No gateway is needed: the bind fails before any connection is tried.
    let mut config = agent_config(dir.path(), "127.0.0.1:9".parse().unwrap());
    config.metrics_listen = Some(taken.local_addr().unwrap());
    let err = agent::start(config).await.unwrap_err();
    assert!(
        matches!(err, agent::RunError::MetricsListen { .. }),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 78);
    assert!(err.to_string().contains("metrics"), "{err}");
    // The outbox was released: the agent can start again without the endpoint.
    let mut config = agent_config(dir.path(), "127.0.0.1:9".parse().unwrap());
    config.metrics_listen = None;
    let mut agent = agent::start(config).await.unwrap();
    assert_eq!(agent.metrics_addr(), None);
    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
}
