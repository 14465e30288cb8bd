//! Signed agent upgrades end to end: a real nats-server, gateway and scheduler, and the real
//! agent binary as its own process (upgrades exec, so the agent cannot be a library here).
//! Each agent runs from a copy of the binary in its test directory, which the upgrade
//! replaces.
//!
//! The "new version" of the good case is a shell script that execs the real agent binary
//! with `AGENT_REPORTED_VERSION` set: a different artifact (its own SHA-256) that reports
//! another version, without building a second agent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use messages::command::CommandSigner;
use scheduler::trust::AgentTokens;
use serde_json::json;
use testkit::NatsServer;
use testkit::http;
use testkit::process::Process;
use testkit::ws::{TEST_AGENT_TOKEN_KEY, TEST_COMMAND_KEY, TEST_COMMAND_PUBLIC, token};

const KEY: &str = "upgrade-api-key-0123456789";
const OLD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Upgrades restart real processes on a busy machine: wait longer than the usual 20 s.
const PATIENCE: Duration = Duration::from_secs(90);

struct Fleet {
    _nats: NatsServer,
    gateway: ws_gateway::Handle,
    sched: scheduler::Handle,
    dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(name: &str) -> Fleet {
        let nats = NatsServer::start().unwrap();
        let gateway = testkit::gateway::start(testkit::gateway::config(&nats.url(), name)).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = scheduler::Config::new(
            nats.url(),
            vec![KEY.to_owned()],
            dir.path().join("scheduler.redb"),
        );
        config.command_key = Arc::new(CommandSigner::from_pem(TEST_COMMAND_KEY).unwrap());
        config.agent_tokens = Some(Arc::new(
            AgentTokens::from_pem(TEST_AGENT_TOKEN_KEY, Duration::from_secs(3600)).unwrap(),
        ));
        let sched = scheduler::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        http::wait_status(sched.addr(), "/readyz", 200).await;
        Fleet {
            _nats: nats,
            gateway,
            sched,
            dir,
        }
    }

    fn api(&self) -> SocketAddr {
        self.sched.addr()
    }

    /// Starts the agent binary `node` from its own copy (`<dir>/<node>/agent`) and waits
    /// until it is online.
    async fn agent(&self, node: &str) -> Agent {
        let home = self.dir.path().join(node);
        std::fs::create_dir_all(&home).unwrap();
        let exe = home.join("agent");
        std::fs::copy(agent_binary(), &exe).unwrap();
        std::fs::write(home.join("command.pub"), TEST_COMMAND_PUBLIC).unwrap();
        let config = home.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"
node_id = "{node}"
token = "{token}"
gateways = ["ws://{gateway}/ws"]
outbox_path = "outbox.redb"
command_keys_file = "command.pub"
scheduler_url = "http://{api}"

[backoff]
base_ms = 50
cap_ms = 500
jitter = 0.3
"#,
                token = token(node, Some("agent"), &[]),
                gateway = self.gateway.addr(),
                api = self.api(),
            ),
        )
        .unwrap();
        let process = Process::start(
            &exe,
            &[config.to_str().unwrap()],
            &[("RUST_LOG", "info".to_owned())],
            home.join("agent.log"),
        );
        let agent = Agent {
            node: node.to_owned(),
            home,
            exe,
            process,
        };
        self.wait(&agent, &format!("/v1/agents/{node}"), |v| {
            v["state"] == "online" && v["version"] == OLD_VERSION
        })
        .await;
        agent
    }

    /// Polls `path` until `check` accepts it; fails with the agent's log.
    async fn wait(
        &self,
        agent: &Agent,
        path: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let give_up = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = http::get(self.api(), path, KEY)
                .await
                .map(|r| r.json())
                .unwrap_or(serde_json::Value::Null);
            if check(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "{path} never got there; last answer: {v}\nagent log:\n{}",
                agent.process.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.sched.shutdown().await.unwrap();
        self.gateway.shutdown().await.unwrap();
    }
}

struct Agent {
    node: String,
    home: PathBuf,
    exe: PathBuf,
    process: Process,
}

impl Agent {
    fn previous(&self) -> PathBuf {
        self.home.join("agent.previous")
    }
}

fn agent_binary() -> PathBuf {
    testkit::process::binary("agent", "agent")
}

fn sha256_hex(bytes: &[u8]) -> String {
    messages::fleet::config_sha256(bytes)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs the real `schedctl`; returns exit code, stdout and stderr.
fn schedctl(api: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_schedctl"))
        .env("SCHEDULER_URL", format!("http://{api}"))
        .env("SCHEDULER_API_KEY", KEY)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn upload(api: SocketAddr, bytes: &[u8]) -> String {
    let auth = format!("Bearer {KEY}");
    let r = http::request(
        api,
        "POST",
        "/v1/artifacts",
        &[("authorization", &auth)],
        bytes,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let sha = r.json()["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha, sha256_hex(bytes));
    sha
}

async fn start_upgrade(api: SocketAddr, node: &str, sha: &str, version: &str, secs: u64) -> u64 {
    let r = http::post_json(
        api,
        "/v1/upgrades",
        KEY,
        &json!({"targets": {"nodes": [node]}, "sha256": sha, "version": version, "deadline_secs": secs}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    r.json()["upgrade_id"].as_u64().unwrap()
}

/// (a) A good artifact is downloaded with the node's credential, verified, installed in
/// place of the running binary, tried, and handed over to: the scheduler shows the node
/// online with the new version, and the previous binary is kept beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_artifact_is_installed_and_the_node_comes_back_with_the_new_version() {
    let fleet = Fleet::start("gw-up-good").await;
    let api = fleet.api();
    let agent = fleet.agent("edge-good").await;
    let original = read(&agent.exe);

    let script = format!(
        "#!/bin/sh\nAGENT_REPORTED_VERSION=9.9.9-e2e exec '{}' \"$@\"\n",
        agent_binary().display()
    );
    let file = fleet.dir.path().join("agent-9.9.9");
    std::fs::write(&file, &script).unwrap();
    // Operators drive it with schedctl.
    let (code, sha, err) = schedctl(api, &["artifact", "upload", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let sha = sha.trim().to_owned();
    assert_eq!(sha, sha256_hex(script.as_bytes()));
    let (code, listed, _) = schedctl(api, &["artifact", "list"]);
    assert_eq!(code, 0);
    assert!(listed.contains(&sha), "{listed}");
    let (code, id, err) = schedctl(
        api,
        &[
            "upgrade",
            "start",
            "--sha256",
            &sha,
            "--version",
            "9.9.9-e2e",
            "--nodes",
            "edge-good",
            "--deadline-secs",
            "60",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id: u64 = id.trim().parse().unwrap();

    let status = fleet
        .wait(&agent, &format!("/v1/upgrades/{id}"), |v| {
            v["nodes"][0]["state"] == "online" && v["nodes"][0]["running_version"] == "9.9.9-e2e"
        })
        .await;
    assert_eq!(status["counts"]["online"], 1, "{status}");
    fleet
        .wait(&agent, &format!("/v1/agents/{}", agent.node), |v| {
            v["state"] == "online" && v["version"] == "9.9.9-e2e"
        })
        .await;
    // The new binary is in place, the old one kept, the record settled (`completed` sent).
    assert_eq!(read(&agent.exe), script.as_bytes());
    assert_eq!(read(&agent.previous()), original);
    let record = agent.home.join("upgrade.json");
    let give_up = std::time::Instant::now() + PATIENCE;
    while record.exists() {
        assert!(
            std::time::Instant::now() < give_up,
            "{}",
            agent.process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, _) = schedctl(api, &["upgrade", "status", &id.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("edge-good") && out.contains("online"), "{out}");
    // The download and the start are audited.
    let audit = http::get(api, "/v1/audit", KEY).await.unwrap().json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"artifact.upload") && actions.contains(&"upgrade.start"),
        "{audit}"
    );
    fleet.stop().await;
}

/// (c) A new binary that exits at once is rolled back: the previous binary is restored
/// and runs again (same process, exec'd), and the scheduler records `rolled_back` with
/// the reason. So is one that hangs past its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_that_exits_at_once_is_rolled_back_and_the_old_one_runs_again() {
    let fleet = Fleet::start("gw-up-broken").await;
    let api = fleet.api();
    let agent = fleet.agent("edge-broken").await;
    let original = read(&agent.exe);

    let sha = upload(api, b"#!/bin/sh\nexit 1\n").await;
    let id = start_upgrade(api, &agent.node, &sha, "6.6.6-broken", 30).await;

    let status = fleet
        .wait(&agent, &format!("/v1/upgrades/{id}"), |v| {
            v["nodes"][0]["state"] == "rolled_back"
        })
        .await;
    let error = status["nodes"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("exited"), "{status}");
    assert_eq!(
        status["nodes"][0]["running_version"], OLD_VERSION,
        "{status}"
    );
    // The old binary is back in place and online.
    assert_eq!(read(&agent.exe), original);
    assert!(!agent.previous().exists());
    fleet
        .wait(&agent, &format!("/v1/agents/{}", agent.node), |v| {
            v["state"] == "online" && v["version"] == OLD_VERSION
        })
        .await;

    // A binary that runs but never registers is killed at the deadline and rolled back
    // too (the restored agent takes upgrades again).
    let sha = upload(api, b"#!/bin/sh\nexec sleep 300\n").await;
    let id = start_upgrade(api, &agent.node, &sha, "6.6.7-hangs", 2).await;
    let status = fleet
        .wait(&agent, &format!("/v1/upgrades/{id}"), |v| {
            v["nodes"][0]["state"] == "rolled_back"
        })
        .await;
    let error = status["nodes"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not register within 2 s"), "{status}");
    assert_eq!(read(&agent.exe), original);
    fleet
        .wait(&agent, &format!("/v1/agents/{}", agent.node), |v| {
            v["state"] == "online" && v["version"] == OLD_VERSION
        })
        .await;
    fleet.stop().await;
}

/// (b) An artifact whose bytes changed after the upload (so they no longer match the
/// SHA-256 the signed manifest names) is refused by the agent: nothing is installed, the
/// old binary keeps running, and the scheduler records the failure. (d) The download
/// takes the node's own credential only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_artifact_is_refused_and_downloads_need_the_agent_credential() {
    let fleet = Fleet::start("gw-up-tamper").await;
    let api = fleet.api();
    let agent = fleet.agent("edge-tamper").await;
    let original = read(&agent.exe);

    let content = b"#!/bin/sh\necho pretend to be an agent\n".to_vec();
    let sha = upload(api, &content).await;
    let download = format!("/v1/artifacts/{sha}");

    // (d) Who may download.
    let get = |auth: Option<String>| {
        let download = download.clone();
        async move {
            let headers: Vec<(&str, &str)> = match &auth {
                Some(a) => vec![("authorization", a.as_str())],
                None => Vec::new(),
            };
            http::request(api, "GET", &download, &headers, b"")
                .await
                .unwrap()
        }
    };
    let agent_token = token(&agent.node, Some("agent"), &[]);
    let ok = get(Some(format!("Bearer {agent_token}"))).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, content);
    assert_eq!(get(None).await.status, 401);
    let app = token(&agent.node, None, &[]);
    assert_eq!(
        get(Some(format!("Bearer {app}"))).await.status,
        401,
        "app token"
    );
    assert_eq!(
        get(Some(format!("Bearer {KEY}"))).await.status,
        401,
        "API key"
    );
    let kind_app = testkit::ws::agent_token_with(&json!({
        "sub": agent.node, "kind": "app", "exp": servicekit::clock::now_secs() + 60
    }));
    assert_eq!(get(Some(format!("Bearer {kind_app}"))).await.status, 401);
    let expired = testkit::ws::agent_token_with(&json!({
        "sub": agent.node, "kind": "agent", "exp": servicekit::clock::now_secs() - 3600
    }));
    assert_eq!(get(Some(format!("Bearer {expired}"))).await.status, 401);
    let ghost = token("ghost-node", Some("agent"), &[]);
    assert_eq!(
        get(Some(format!("Bearer {ghost}"))).await.status,
        403,
        "unregistered"
    );
    let bad_name = http::request(
        api,
        "GET",
        "/v1/artifacts/..%2F..%2Fetc%2Fpasswd",
        &[("authorization", &format!("Bearer {agent_token}"))],
        b"",
    )
    .await
    .unwrap();
    assert!(
        bad_name.status == 400 || bad_name.status == 404,
        "{}",
        bad_name.status
    );

    // (b) Change the stored bytes (same size) after the upload.
    let blob = fleet.dir.path().join("artifacts").join(&sha);
    let mut tampered = content.clone();
    tampered[12] ^= 0x20;
    std::fs::write(&blob, &tampered).unwrap();
    let id = start_upgrade(api, &agent.node, &sha, "7.7.7-tampered", 30).await;
    let status = fleet
        .wait(&agent, &format!("/v1/upgrades/{id}"), |v| {
            v["nodes"][0]["state"] == "failed"
        })
        .await;
    let error = status["nodes"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("sha256 mismatch"), "{status}");
    // Nothing was installed; the old binary keeps running and serving.
    assert_eq!(read(&agent.exe), original);
    assert!(!agent.previous().exists());
    assert!(!agent.home.join("agent.upgrade").exists());
    assert!(!agent.home.join("upgrade.json").exists());
    fleet
        .wait(&agent, &format!("/v1/agents/{}", agent.node), |v| {
            v["state"] == "online" && v["version"] == OLD_VERSION
        })
        .await;

    // The API refuses what it can check itself.
    let r = http::post_json(
        api,
        "/v1/upgrades",
        KEY,
        &json!({"targets": {"nodes": [agent.node]}, "sha256": sha256_hex(b"never uploaded"), "version": "1.0"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert_eq!(r.json()["error"], "unknown_artifact");
    let r = http::post_json(
        api,
        "/v1/upgrades",
        KEY,
        &json!({"targets": {"nodes": [agent.node]}, "sha256": sha, "version": "1 0"}),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["error"], "invalid_upgrade", "{:?}", r.json());
    fleet.stop().await;
}

/// A staged rollout of an upgrade over two real agents: a broken binary is rolled back on
/// the pilot's node and halts the rollout before the second node hears of it; after an
/// abort, a good binary goes through both stages and both nodes come back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_rollout_halts_on_a_rolled_back_pilot_and_completes_with_a_good_binary() {
    let fleet = Fleet::start("gw-up-rollout").await;
    let api = fleet.api();
    let a = fleet.agent("roll-a").await;
    let b = fleet.agent("roll-b").await;
    let originals = [read(&a.exe), read(&b.exe)];

    let broken = upload(api, b"#!/bin/sh\nexit 1\n").await;
    let start = |sha: String, version: &'static str| {
        tokio::task::spawn_blocking(move || {
            schedctl(
                api,
                &[
                    "--json",
                    "rollout",
                    "start",
                    "--nodes",
                    "roll-a,roll-b",
                    "--stages",
                    "pilot=1,full=100%",
                    "--auto-promote",
                    "--max-failure-percent",
                    "0",
                    "--upgrade",
                    &sha,
                    "--version",
                    version,
                    "--deadline-secs",
                    "30",
                ],
            )
        })
    };
    let (code, out, err) = start(broken, "6.6.6-broken").await.unwrap();
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["rollout_id"]
        .as_u64()
        .unwrap();
    let path = format!("/v1/rollouts/{id}");
    let v = fleet
        .wait(&a, &path, |v| {
            v["state"] == "halted" && v["batch"].is_null()
        })
        .await;
    assert_eq!(v["started"], 1, "only the pilot: {v}");
    assert_eq!(v["stages"][0]["failed"], 1, "{v}");
    let pilot_upgrade = v["history"][0]["upgrade_id"].as_u64().unwrap();
    let up = http::get(api, &format!("/v1/upgrades/{pilot_upgrade}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(up["nodes"][0]["state"], "rolled_back", "{up}");
    // Both nodes still run their original binaries.
    assert_eq!(read(&a.exe), originals[0]);
    assert_eq!(read(&b.exe), originals[1]);
    let (code, _, err) =
        tokio::task::spawn_blocking(move || schedctl(api, &["rollout", "abort", &id.to_string()]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");

    let script = format!(
        "#!/bin/sh\nAGENT_REPORTED_VERSION=9.9.9-e2e exec '{}' \"$@\"\n",
        agent_binary().display()
    );
    let good = upload(api, script.as_bytes()).await;
    let (code, out, err) = start(good, "9.9.9-e2e").await.unwrap();
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["rollout_id"]
        .as_u64()
        .unwrap();
    let v = fleet
        .wait(&b, &format!("/v1/rollouts/{id}"), |v| {
            v["state"] == "completed"
        })
        .await;
    assert_eq!(v["succeeded"], 2, "{v}");
    for agent in [&a, &b] {
        fleet
            .wait(agent, &format!("/v1/agents/{}", agent.node), |v| {
                v["state"] == "online" && v["version"] == "9.9.9-e2e"
            })
            .await;
        assert_eq!(read(&agent.exe), script.as_bytes());
    }
    fleet.stop().await;
}
