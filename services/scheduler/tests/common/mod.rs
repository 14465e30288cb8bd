//! What the fleet's end-to-end tests share: a real nats-server, one real gateway and the
//! real scheduler ([`Fleet`]), and real agents from a TOML config ([`agent_config`]).
//! Used by `fleet_e2e.rs` and `console_e2e.rs`; each uses a part of it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};

use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::http;

pub(crate) const KEY: &str = "e2e-api-key-0123456789";
/// A read-scope key: may GET, may change nothing.
pub(crate) const READ_KEY: &str = "e2e-read-key-0123456789";

pub(crate) async fn ready(addr: SocketAddr) {
    http::wait_status(addr, "/readyz", 200).await;
}

/// Polls until `check` accepts the JSON at `path`.
pub(crate) async fn eventually(
    addr: SocketAddr,
    path: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    http::eventually(addr, path, KEY, check).await
}

/// The scheduler's configuration for these tests: its store in `dir`, an operator key
/// (`ops`, [`KEY`]) and a read key (`dashboard`, [`READ_KEY`]), the test command key.
pub(crate) fn scheduler_config(nats_url: &str, dir: &std::path::Path) -> scheduler::Config {
    let mut config =
        scheduler::Config::new(nats_url, vec![KEY.to_owned()], dir.join("scheduler.redb"));
    config.api_keys =
        scheduler::auth::parse_keys(&format!("ops:operator:{KEY},dashboard:read:{READ_KEY}"))
            .unwrap();
    config.command_key = std::sync::Arc::new(
        messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap(),
    );
    config
}

pub(crate) fn agent_config(
    dir: &std::path::Path,
    node: &str,
    region: &str,
    gateway: SocketAddr,
) -> agent::AgentConfig {
    agent_config_with(dir, node, region, gateway, "")
}

/// [`agent_config`] with `extra` top-level TOML lines (`config_dir = ...`).
pub(crate) fn agent_config_with(
    dir: &std::path::Path,
    node: &str,
    region: &str,
    gateway: SocketAddr,
    extra: &str,
) -> agent::AgentConfig {
    let text = AgentToml::new(node)
        .gateway(format!("ws://{gateway}/ws"))
        .line(r#"allowed_commands = ["echo", "sh"]"#)
        .line(extra)
        .label("region", region)
        .render(dir);
    agent::AgentConfig::from_toml(&text, &dir.join(format!("{node}.toml")), |_| None).unwrap()
}

/// NATS, one gateway and the scheduler, all real; the agents come per test.
pub(crate) struct Fleet {
    /// The bus.
    pub nats: NatsServer,
    /// The one gateway.
    pub gateway: ws_gateway::Handle,
    /// The scheduler, with an operator key [`KEY`] (`ops`) and a read key [`READ_KEY`] (`dashboard`).
    pub sched: scheduler::Handle,
    /// Agents' files.
    pub dir: tempfile::TempDir,
}

impl Fleet {
    pub(crate) async fn start(gateway_name: &str) -> Fleet {
        let nats = NatsServer::start().unwrap();
        let url = nats.url();
        let gateway = testkit::gateway::start(testkit::gateway::config(&url, gateway_name)).await;
        let dir = tempfile::tempdir().unwrap();
        let config = scheduler_config(&url, dir.path());
        let sched = scheduler::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        ready(sched.addr()).await;
        Fleet {
            nats,
            gateway,
            sched,
            dir,
        }
    }

    /// Starts a real agent `node` (label region=`region`) and waits until it is online.
    pub(crate) async fn agent(&self, node: &str, region: &str) -> agent::AgentHandle {
        let config = agent_config(self.dir.path(), node, region, self.gateway.addr());
        let handle = agent::start(config).await.unwrap();
        eventually(self.sched.addr(), &format!("/v1/agents/{node}"), |v| {
            v["state"] == "online"
        })
        .await;
        handle
    }

    /// Starts a real agent that takes config documents into `<dir>/<node>-etc` and waits
    /// until it is online.
    pub(crate) async fn config_agent(&self, node: &str, region: &str) -> agent::AgentHandle {
        let config = agent_config_with(
            self.dir.path(),
            node,
            region,
            self.gateway.addr(),
            // Each agent its own applied-versions file (the default sits beside the outbox,
            // which these agents share a directory with).
            &format!("config_dir = \"{node}-etc\"\nconfig_state_path = \"{node}-configs.json\""),
        );
        let handle = agent::start(config).await.unwrap();
        eventually(self.sched.addr(), &format!("/v1/agents/{node}"), |v| {
            v["state"] == "online"
        })
        .await;
        handle
    }

    /// Where `node`'s config documents are written.
    pub(crate) fn etc(&self, node: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{node}-etc"))
    }

    pub(crate) async fn stop(self) {
        self.sched.shutdown().await.unwrap();
        self.gateway.shutdown().await.unwrap();
    }
}
