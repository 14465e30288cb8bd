//! Agent credentials end to end: short-lived tokens renewed over the live connection
//! (across a gateway restart), and revocation. Real nats-server, gateway, scheduler and
//! agent (the agent library over real WebSocket connections).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use messages::UserId;
use messages::command::CommandSigner;
use scheduler::trust::AgentTokens;
use serde_json::json;
use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::http;
use testkit::ws::{TEST_AGENT_TOKEN_KEY, TEST_COMMAND_KEY};

const KEY: &str = "cred-api-key-0123456789";
const TTL: Duration = Duration::from_secs(5);

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn tokens() -> AgentTokens {
    AgentTokens::from_pem(TEST_AGENT_TOKEN_KEY, TTL).unwrap()
}

fn gateway(nats: &str, listener: TcpListener) -> ws_gateway::Handle {
    ws_gateway::spawn(testkit::gateway::config(nats, "gw-cred"), listener).unwrap()
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..400 {
        if let Ok(l) = TcpListener::bind(addr) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cannot bind {addr} again");
}

struct Fleet {
    nats: NatsServer,
    gateway: Option<ws_gateway::Handle>,
    gateway_addr: SocketAddr,
    sched: scheduler::Handle,
    dir: tempfile::TempDir,
}

impl Fleet {
    async fn start() -> Fleet {
        let nats = NatsServer::start().unwrap();
        let gw = gateway(&nats.url(), TcpListener::bind("127.0.0.1:0").unwrap());
        let gateway_addr = gw.addr();
        http::wait_status(gateway_addr, "/readyz", 200).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = scheduler::Config::new(
            nats.url(),
            vec![KEY.to_owned()],
            dir.path().join("scheduler.redb"),
        );
        config.command_key = Arc::new(CommandSigner::from_pem(TEST_COMMAND_KEY).unwrap());
        config.agent_tokens = Some(Arc::new(tokens()));
        let sched = scheduler::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        http::wait_status(sched.addr(), "/readyz", 200).await;
        Fleet {
            nats,
            gateway: Some(gw),
            gateway_addr,
            sched,
            dir,
        }
    }

    async fn restart_gateway(&mut self) {
        if let Some(gw) = self.gateway.take() {
            gw.shutdown().await.unwrap();
        }
        let listener = rebind(self.gateway_addr).await;
        self.gateway = Some(gateway(&self.nats.url(), listener));
        http::wait_status(self.gateway_addr, "/readyz", 200).await;
    }

    async fn stop(mut self) {
        self.sched.shutdown().await.unwrap();
        if let Some(gw) = self.gateway.take() {
            gw.shutdown().await.unwrap();
        }
    }
}

/// An agent enrolled with a 5-second token in `token_file`.
fn agent_config(dir: &Path, node: &str, gateway: SocketAddr) -> agent::AgentConfig {
    let (token, _) = tokens()
        .mint(&UserId::new(node).unwrap(), now_s(), TTL)
        .unwrap();
    std::fs::write(dir.join(format!("{node}.token")), token).unwrap();
    let text = AgentToml::new(node)
        .token_file(&format!("{node}.token"))
        .gateway(format!("ws://{gateway}/ws"))
        .line(r#"allowed_commands = ["echo", "sh", "sleep"]"#)
        .render(dir);
    agent::AgentConfig::from_toml(&text, &dir.join(format!("{node}.toml")), |_| None).unwrap()
}

async fn create(api: SocketAddr, node: &str, argv: &[&str]) -> String {
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"nodes": [node]}, "spec": {"kind": "command", "argv": argv}, "timeout_ms": 10000, "max_attempts": 20}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    r.json()["task_id"].to_string()
}

async fn eventually(
    addr: SocketAddr,
    path: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    http::eventually(addr, path, KEY, check).await
}

async fn outbox_len(agent: &agent::AgentHandle) -> u64 {
    let outbox = Arc::clone(agent.outbox());
    tokio::task::spawn_blocking(move || outbox.len().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_tokens_are_renewed_for_a_minute_across_a_gateway_restart() {
    let mut fleet = Fleet::start().await;
    let api = fleet.sched.addr();
    let mut agent = agent::start(agent_config(fleet.dir.path(), "edge-1", fleet.gateway_addr))
        .await
        .unwrap();
    eventually(api, "/v1/agents/edge-1", |v| v["state"] == "online").await;

    // Twelve rounds of five seconds: the enrolment token is long dead after the first.
    let start = tokio::time::Instant::now();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(60) {
        round += 1;
        if round == 6 {
            fleet.restart_gateway().await;
        }
        let id = create(api, "edge-1", &["echo", &format!("round-{round}")]).await;
        let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
            v["targets"]["edge-1"]["state"] == "succeeded"
        })
        .await;
        assert!(
            v["results"][0]["body"]["stdout_tail"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("round-{round}")),
            "{v}"
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let renewed = agent.metrics().credentials_renewed();
    assert!(renewed >= 10, "only {renewed} renewals in a minute");
    // Each renewal refreshed the live session: one session before the gateway restart and
    // one after, not one per token lifetime.
    let sessions = agent.metrics().sessions();
    assert!(
        sessions <= 3,
        "{sessions} sessions: renewals did not refresh the session"
    );
    // The newest credential is on disk for a restart, and it is not the enrolment token.
    let stored = std::fs::read_to_string(fleet.dir.path().join("credential.jwt")).unwrap();
    let enrolment = std::fs::read_to_string(fleet.dir.path().join("edge-1.token")).unwrap();
    assert_ne!(stored, enrolment);
    // Up (a busy test machine may make the agent report itself degraded).
    eventually(api, "/v1/agents/edge-1", |v| {
        v["state"] == "online" || v["state"] == "degraded"
    })
    .await;
    agent.stop();
    // It never stopped on its own: it stops now, cleanly.
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), agent.join())
            .await
            .unwrap(),
        Ok(())
    ));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_refused_and_loses_no_result() {
    let fleet = Fleet::start().await;
    let api = fleet.sched.addr();
    let dir = fleet.dir.path().to_owned();
    let mut agent = agent::start(agent_config(&dir, "edge-2", fleet.gateway_addr))
        .await
        .unwrap();
    eventually(api, "/v1/agents/edge-2", |v| v["state"] == "online").await;

    // A task that finishes after the revocation: its result must not be lost.
    let id = create(api, "edge-2", &["sh", "-c", "sleep 2; echo late"]).await;
    eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["edge-2"]["state"] == "running"
    })
    .await;
    let r = http::post_json(api, "/v1/agents/edge-2/revoke", KEY, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());

    // Disconnected: offline, and it stays so while its token would still be valid and after
    // it expired (the gateway then refuses the handshake too).
    eventually(api, "/v1/agents/edge-2", |v| v["state"] == "offline").await;
    for _ in 0..200 {
        if outbox_len(&agent).await >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        outbox_len(&agent).await,
        1,
        "the late result waits in the outbox"
    );
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    let v = http::get(api, "/v1/agents/edge-2", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["state"], "offline", "{v}");
    let task = http::get(api, &format!("/v1/tasks/{id}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(task["targets"]["edge-2"]["state"], "running", "{task}");
    // A new enrolment token is refused while revoked.
    let r = http::post_json(api, "/v1/agents/edge-2/token", KEY, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.json());
    // The revocation is audited with the key's name.
    let audit = http::get(api, "/v1/audit", KEY).await.unwrap().json();
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "agent.revoke" && e["target"] == "agent/edge-2"),
        "{audit}"
    );

    // Lifted and enrolled again (the operator drops the new token into the token file):
    // the agent, which never exited, comes back and delivers the result it kept.
    let r = http::delete(api, "/v1/agents/edge-2/revoke", KEY)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = http::post_json(
        api,
        "/v1/agents/edge-2/token",
        KEY,
        &json!({"ttl_secs": 60}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    std::fs::write(
        dir.join("edge-2.token"),
        r.json()["token"].as_str().unwrap(),
    )
    .unwrap();
    let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["edge-2"]["state"] == "succeeded"
    })
    .await;
    assert!(
        v["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("late"),
        "{v}"
    );
    for _ in 0..200 {
        if outbox_len(&agent).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(outbox_len(&agent).await, 0);
    agent.stop();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), agent.join())
            .await
            .unwrap(),
        Ok(())
    ));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_labels_override_what_the_agent_reports() {
    let fleet = Fleet::start().await;
    let api = fleet.sched.addr();
    // Pinned before the node ever registered.
    let r = http::request_json(
        api,
        "PUT",
        "/v1/agents/edge-3/labels",
        KEY,
        &json!({"labels": {"region": "us", "tier": "gold"}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let mut config = agent_config(fleet.dir.path(), "edge-3", fleet.gateway_addr);
    config.labels.insert("region".into(), "eu".into());
    config.labels.insert("rack".into(), "r7".into());
    let mut agent = agent::start(config).await.unwrap();
    let v = eventually(api, "/v1/agents/edge-3", |v| v["state"] == "online").await;
    assert_eq!(v["labels"]["region"], "us", "{v}");
    assert_eq!(v["labels"]["tier"], "gold", "{v}");
    assert_eq!(
        v["labels"]["rack"], "r7",
        "self-reported labels still count: {v}"
    );
    assert_eq!(v["pinned_labels"]["region"], "us", "{v}");
    // Selecting by the self-reported value finds nobody; the pinned one finds the node.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"labels": {"region": "eu"}}, "spec": {"kind": "command", "argv": ["echo", "x"]}}),
    )
    .await
    .unwrap();
    assert_ne!(
        r.status,
        201,
        "region=eu must not select edge-3: {:?}",
        r.json()
    );
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"labels": {"region": "us"}}, "spec": {"kind": "command", "argv": ["echo", "pinned"]}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["task_id"].to_string();
    eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["edge-3"]["state"] == "succeeded"
    })
    .await;
    // Unpinning drops the pins from the record at once.
    let r = http::request_json(
        api,
        "PUT",
        "/v1/agents/edge-3/labels",
        KEY,
        &json!({"labels": {}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let v = http::get(api, "/v1/agents/edge-3", KEY)
        .await
        .unwrap()
        .json();
    assert!(v["labels"].get("tier").is_none(), "{v}");
    agent.stop();
    let _ = agent.join().await;
    fleet.stop().await;
}

/// Runs the real `schedctl`; returns exit code and stdout.
fn schedctl(api: SocketAddr, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_schedctl"))
        .env("SCHEDULER_URL", format!("http://{api}"))
        .env("SCHEDULER_API_KEY", KEY)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_enrol_pin_and_revoke_with_schedctl() {
    let fleet = Fleet::start().await;
    let api = fleet.sched.addr();
    // An enrolment token for the node, alone on stdout.
    let (code, out) = tokio::task::spawn_blocking(move || schedctl(api, &["enrol", "edge-9"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim().split('.').count(), 3, "{out}");
    let (code, _) =
        tokio::task::spawn_blocking(move || schedctl(api, &["pin", "edge-9", "tier=gold"]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    let (code, _) = tokio::task::spawn_blocking(move || schedctl(api, &["pin", "edge-9", "oops"]))
        .await
        .unwrap();
    assert_eq!(code, 64, "a label without '=' is a usage error");
    let (code, out) = tokio::task::spawn_blocking(move || schedctl(api, &["revoke", "edge-9"]))
        .await
        .unwrap();
    assert_eq!((code, out.trim()), (0, "edge-9: revoked=true"));
    // Revoked: no enrolment; lifted: enrolment again.
    let (code, _) = tokio::task::spawn_blocking(move || schedctl(api, &["enrol", "edge-9"]))
        .await
        .unwrap();
    assert_eq!(code, 1);
    let (code, out) =
        tokio::task::spawn_blocking(move || schedctl(api, &["revoke", "--lift", "edge-9"]))
            .await
            .unwrap();
    assert_eq!((code, out.trim()), (0, "edge-9: revoked=false"));
    let audit = http::get(api, "/v1/audit", KEY).await.unwrap().json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        [
            "agent.enrol",
            "agent.labels",
            "agent.revoke",
            "agent.unrevoke"
        ]
    );
    fleet.stop().await;
}
