//! Smoke test of the load generator: short versions of every `loadtest run` scenario
//! against real services started in-process (nats-server, two gateways, ws-api, the
//! scheduler) and of the peer run against nats-server's WebSocket listener, each run as
//! the real binary with real worker processes. Proves the
//! generator works end to end; asserts counts, never timings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use testkit::NatsServer;
use testkit::http::wait_status;
use testkit::ws::TEST_SECRET;

const KEY: &str = "smoke-api-key-0123456789";

struct Services {
    nats: NatsServer,
    gateways: Vec<ws_gateway::Handle>,
    api: ws_api::Handle,
    sched: scheduler::Handle,
    _dir: tempfile::TempDir,
}

async fn start() -> Services {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let mut gateways = Vec::new();
    for i in 1..=2 {
        let mut config = testkit::gateway::config(&url, &format!("smoke-gw-{i}"));
        config.presence_sync = Duration::from_secs(15);
        let gw = testkit::gateway::start(config).await;
        gateways.push(gw);
    }
    let api = ws_api::spawn(
        ws_api::Config::new(&url, vec![KEY.to_owned()]),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    wait_status(api.addr(), "/readyz", 200).await;
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler::spawn(
        scheduler::Config::new(&url, vec![KEY.to_owned()], dir.path().join("s.redb")),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    wait_status(sched.addr(), "/readyz", 200).await;
    Services {
        nats,
        gateways,
        api,
        sched,
        _dir: dir,
    }
}

impl Services {
    fn urls(&self) -> String {
        self.gateways
            .iter()
            .map(|g| format!("ws://{}/ws", g.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn stop(self) {
        self.sched.shutdown().await.unwrap();
        self.api.shutdown().await.unwrap();
        for g in self.gateways {
            g.shutdown().await.unwrap();
        }
        drop(self.nats);
    }
}

/// Runs `loadtest` with the common options, `run`, and `args`; returns the summary.
async fn run(
    urls: &str,
    out: &Path,
    name: &str,
    connections: usize,
    prefix: &str,
    args: &[String],
) -> serde_json::Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loadtest"));
    let agent_key = out.with_extension("agent-token.key");
    std::fs::write(&agent_key, testkit::ws::TEST_AGENT_TOKEN_KEY).unwrap();
    cmd.env("LOADTEST_SECRET", TEST_SECRET)
        .env("LOADTEST_AGENT_TOKEN_KEY_FILE", &agent_key)
        .env("LOADTEST_API_KEY", KEY)
        .args(["--urls", urls, "--sources", "2", "--user-prefix", prefix])
        .args(["--connections", &connections.to_string()])
        .args(["run", "--name", name, "--workers", "2", "--max-secs", "40"])
        .arg("--out")
        .arg(out)
        .args(args);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains(&format!("== {name}")), "{stdout}");
    let html = std::fs::read_to_string(out.join(format!("{name}.html"))).unwrap();
    assert!(html.contains("<svg"), "report without charts");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(format!("{name}.json"))).unwrap())
            .unwrap();
    assert!(json["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    json["summary"].clone()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_real_services() {
    let services = start().await;
    let urls = services.urls();
    let out = tempfile::tempdir().unwrap();
    let api = services.api.addr().to_string();
    let sched: SocketAddr = services.sched.addr();
    let gw_pid = std::process::id().to_string();

    // 1. Connect storm over both gateways (this process hosts them: its RSS is sampled).
    let storm = run(
        &urls,
        out.path(),
        "storm",
        200,
        "storm",
        &s(&[
            "--scenario",
            "storm",
            "--rate",
            "1000",
            "--hold-secs",
            "1",
            "--gateway-pids",
            &format!("{gw_pid},{gw_pid}"),
        ]),
    )
    .await;
    assert_eq!(storm["connections_open"], 200, "{storm}");
    assert_eq!(storm["connect_errors"], 0, "{storm}");
    assert!(storm["gw1_rss_kib"].as_u64().is_some(), "{storm}");

    // 2. Broadcast with receipts through ws-api: every client gets and acks every push.
    let receipts = run(
        &urls,
        out.path(),
        "receipts",
        100,
        "rcpt",
        &s(&[
            "--scenario",
            "broadcast",
            "--receipts",
            "--pushes",
            "3",
            "--interval-secs",
            "0.5",
            "--size",
            "1024",
            "--api",
            &api,
        ]),
    )
    .await;
    assert_eq!(receipts["pushes_sent"], 3, "{receipts}");
    assert_eq!(receipts["delivered"], 300, "{receipts}");
    assert_eq!(receipts["acks_sent"], 300, "{receipts}");
    assert_eq!(receipts["lost"], 0, "{receipts}");
    assert_eq!(
        receipts["api_targeted"].as_u64().map(|t| t > 0),
        Some(true),
        "{receipts}"
    );

    // 3. Without receipts, published straight on NATS: delivered, never acked.
    let plain = run(
        &urls,
        out.path(),
        "plain",
        100,
        "plain",
        &s(&[
            "--scenario",
            "broadcast",
            "--pushes",
            "2",
            "--interval-secs",
            "0.5",
            "--via",
            "nats",
            "--nats-url",
            &services.nats.url(),
        ]),
    )
    .await;
    assert_eq!(plain["delivered"], 200, "{plain}");
    assert_eq!(plain["acks_sent"], 0, "{plain}");

    // 4. Under churn: connections cycle every second and pushes still arrive.
    let churn = run(
        &urls,
        out.path(),
        "churn",
        100,
        "churn",
        &s(&[
            "--scenario",
            "broadcast",
            "--receipts",
            "--pushes",
            "3",
            "--interval-secs",
            "1",
            "--churn",
            "0.2",
            "--api",
            &api,
        ]),
    )
    .await;
    assert_eq!(churn["pushes_sent"], 3, "{churn}");
    assert!(churn["reconnects"].as_u64().unwrap() > 0, "{churn}");
    assert!(churn["delivered"].as_u64().unwrap() > 0, "{churn}");

    // 5. Fleet: simulated agents register, one command task reaches all, results stored.
    let fleet = run(
        &urls,
        out.path(),
        "fleet",
        40,
        "smoke-agent",
        &s(&[
            "--scenario",
            "fleet",
            "--hold-secs",
            "1",
            "--scheduler",
            &sched.to_string(),
        ]),
    )
    .await;
    assert_eq!(fleet["agents_online_at_scheduler"], 40, "{fleet}");
    assert_eq!(fleet["task_finished"], true, "{fleet}");
    assert_eq!(fleet["results_stored"], 40, "{fleet}");
    assert_eq!(fleet["task_states"]["succeeded"], 40, "{fleet}");

    services.stop().await;

    // 6. The peer: the same broadcast served by nats-server's own WebSocket listener.
    let ws_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = out.path().join("ws.conf");
    std::fs::write(
        &conf,
        format!("websocket {{ listen: \"127.0.0.1:{ws_port}\", no_tls: true }}\n"),
    )
    .unwrap();
    let client_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut peer = std::process::Command::new(testkit::nats_server_binary().unwrap())
        .args(["-c"])
        .arg(&conf)
        .args(["-a", "127.0.0.1", "-p", &client_port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", ws_port)).is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "nats-server websocket listener did not come up");
    let peer_summary = run(
        &format!("ws://127.0.0.1:{ws_port}"),
        out.path(),
        "peer",
        100,
        "peer",
        &s(&[
            "--scenario",
            "broadcast",
            "--peer-nats-ws",
            "--pushes",
            "2",
            "--interval-secs",
            "0.5",
            "--nats-url",
            &format!("nats://127.0.0.1:{client_port}"),
        ]),
    )
    .await;
    let _ = peer.kill();
    let _ = peer.wait();
    assert_eq!(peer_summary["delivered"], 200, "{peer_summary}");
    assert_eq!(peer_summary["lost"], 0, "{peer_summary}");
}
