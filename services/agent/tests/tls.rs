//! The agent over `wss://`: the real agent library against a real gateway (on a real
//! nats-server) behind a TLS-terminating proxy (the gateway does not terminate TLS itself
//! yet). A test CA signs the proxy's certificate; the agent registers when it trusts that
//! CA (and the key matches its pins), and otherwise refuses the handshake, logs the cause
//! and keeps retrying without ever reaching the gateway. Plus the TLS settings' config
//! errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agent::{AgentConfig, AgentHandle, ConfigError, Origin, Problem};
use futures_util::StreamExt;
use messages::fleet::{self, Register};
use messages::payload::from_bus;
use messages::{ClientKind, subject};
use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::tls::{TestCa, TlsProxy};

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(20);

/// Everything the agents in this test binary log, for assertions on their error messages.
/// Each test's gateway has its own port, so lines are told apart by the URL.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("agent=info")
            .with_writer(move || Capture(Arc::clone(&sink)))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines that mention `url` and contain `text`.
fn lines_with(url: &str, text: &str) -> Vec<String> {
    let all = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    all.lines()
        .filter(|l| l.contains(url) && l.contains(text))
        .map(str::to_owned)
        .collect()
}

/// Waits until at least `n` log lines mention `url` and contain `text` (the agent tried,
/// failed with that cause, and tried again).
async fn wait_for_lines(url: &str, text: &str, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = lines_with(url, text);
        if found.len() >= n {
            return found;
        }
        if tokio::time::Instant::now() >= deadline {
            let all = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
            panic!("fewer than {n} lines with {url} and {text:?} within {WAIT:?}; log:\n{all}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    _nats: NatsServer,
    nats_url: String,
    gateway: ws_gateway::Handle,
}

async fn setup() -> Setup {
    logs();
    let nats = NatsServer::start().unwrap();
    let nats_url = nats.url();
    let gateway = testkit::gateway::start(testkit::gateway::config(&nats_url, "gw-tls")).await;
    Setup {
        _nats: nats,
        nats_url,
        gateway,
    }
}

/// An agent configuration for `url`, with extra TOML lines (the TLS settings).
fn agent_config(dir: &Path, node: &str, url: &str, extra: &str) -> AgentConfig {
    let text = AgentToml::new(node)
        .gateway(url)
        .outbox("outbox.redb")
        .line(extra)
        .render(dir);
    AgentConfig::from_toml(&text, &dir.join("agent.toml"), |_| None).unwrap()
}

/// Waits for `node`'s register message on the bus.
async fn registered(
    nats_url: &str,
    node: &str,
    start: impl Future<Output = AgentHandle>,
) -> AgentHandle {
    let nats = async_nats::connect(nats_url).await.unwrap();
    let mut sub = nats
        .subscribe(subject::upstream_wildcard(ClientKind::Agent))
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let agent = start.await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{node} did not register within {WAIT:?}"))
            .unwrap();
        if msg.subject.as_str().ends_with(fleet::up::REGISTER) {
            let register: Register = from_bus(&msg.payload).unwrap();
            if register.node_id == node {
                return agent;
            }
        }
    }
}

async fn stop(mut agent: AgentHandle) {
    agent.stop();
    // Ok: a refused handshake never made the agent give up with an error.
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
}

fn wss(addr: SocketAddr) -> String {
    format!("wss://{addr}/ws")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_over_wss_when_it_trusts_the_gateways_ca() {
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("agent-test-ca");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let proxy = TlsProxy::start(&ca.server_cert(), s.gateway.addr())
        .await
        .unwrap();
    let config = agent_config(
        dir.path(),
        "tls-node-1",
        &wss(proxy.addr()),
        &format!("tls_ca_file = {:?}", ca_file.display().to_string()),
    );
    assert_eq!(config.tls.ca_file.as_deref(), Some(ca_file.as_path()));
    let agent = registered(&s.nats_url, "tls-node-1", async {
        agent::start(config).await.unwrap()
    })
    .await;
    assert!(proxy.handshakes() >= 1);
    assert!(agent.metrics().connected());
    stop(agent).await;
    s.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_signed_by_another_ca_is_refused_with_a_clear_error_and_retried() {
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let trusted = TestCa::new("trusted-ca");
    let other = TestCa::new("other-ca");
    let ca_file = trusted.write(&dir.path().join("ca.pem"));
    let proxy = TlsProxy::start(&other.server_cert(), s.gateway.addr())
        .await
        .unwrap();
    let url = wss(proxy.addr());
    let config = agent_config(
        dir.path(),
        "tls-node-2",
        &url,
        &format!("tls_ca_file = {:?}", ca_file.display().to_string()),
    );
    let agent = agent::start(config).await.unwrap();
    // Refused, logged with the cause and the setting to check, and tried again.
    let lines = wait_for_lines(&url, "not signed by a trusted CA", 2).await;
    assert!(lines[0].contains("check tls_ca_file"), "{lines:?}");
    assert!(lines[0].contains("TLS handshake failed"), "{lines:?}");
    // Nothing got through the proxy to the gateway.
    assert_eq!(proxy.handshakes(), 0);
    assert!(proxy.failed_handshakes() >= 2);
    assert!(!agent.metrics().connected());
    assert_eq!(agent.metrics().sessions(), 0);
    stop(agent).await;
    s.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused_with_a_clear_error() {
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("agent-test-ca");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let proxy = TlsProxy::start(&ca.server_cert_for(&["gw.example"]), s.gateway.addr())
        .await
        .unwrap();
    let url = wss(proxy.addr());
    let config = agent_config(
        dir.path(),
        "tls-node-3",
        &url,
        &format!("tls_ca_file = {:?}", ca_file.display().to_string()),
    );
    let agent = agent::start(config).await.unwrap();
    let lines = wait_for_lines(&url, "certificate name mismatch", 2).await;
    assert!(
        lines[0].contains("not valid for 127.0.0.1, only for gw.example"),
        "{lines:?}"
    );
    assert_eq!(proxy.handshakes(), 0);
    stop(agent).await;
    s.gateway.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_mismatch_is_refused_and_the_right_pin_connects() {
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("agent-test-ca");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let served = ca.server_cert();
    // Signed by the same, trusted CA, but another key: chain validation alone would pass.
    let other_key = ca.server_cert();
    let proxy = TlsProxy::start(&served, s.gateway.addr()).await.unwrap();
    let url = wss(proxy.addr());
    let ca_line = format!("tls_ca_file = {:?}", ca_file.display().to_string());

    let wrong_dir = dir.path().join("wrong");
    std::fs::create_dir(&wrong_dir).unwrap();
    let wrong = agent_config(
        &wrong_dir,
        "tls-node-4",
        &url,
        &format!("{ca_line}\ntls_pin_sha256 = [\"{}\"]", other_key.pin_hex()),
    );
    let agent = agent::start(wrong).await.unwrap();
    let lines = wait_for_lines(&url, "certificate pin mismatch", 2).await;
    // The message names the key the gateway presented, so an operator can compare.
    assert!(
        lines[0].contains(&format!("sha256/{}", served.pin_base64())),
        "{lines:?}"
    );
    assert!(lines[0].contains("check tls_pin_sha256"), "{lines:?}");
    assert_eq!(proxy.handshakes(), 0);
    assert_eq!(agent.metrics().sessions(), 0);
    stop(agent).await;

    // Any one matching pin of a list is enough (rotation: old and new key side by side);
    // base64 with the sha256/ prefix and hex both work.
    let right_dir = dir.path().join("right");
    std::fs::create_dir(&right_dir).unwrap();
    let right = agent_config(
        &right_dir,
        "tls-node-5",
        &url,
        &format!(
            "{ca_line}\ntls_pin_sha256 = [\"{}\", \"sha256/{}\"]",
            other_key.pin_hex(),
            served.pin_base64()
        ),
    );
    let agent = registered(&s.nats_url, "tls-node-5", async {
        agent::start(right).await.unwrap()
    })
    .await;
    assert!(proxy.handshakes() >= 1);
    stop(agent).await;
    s.gateway.shutdown().await.unwrap();
}

// --- configuration ------------------------------------------------------------------------

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

fn load(
    dir: &Path,
    extra: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<AgentConfig, ConfigError> {
    let text = format!(
        r#"
node_id = "n1"
token = "secret"
gateways = ["wss://gw.example/ws"]
outbox_path = "outbox.redb"
{extra}
"#
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    AgentConfig::load(Some(&path), env)
}

fn invalid(err: ConfigError) -> (&'static str, Origin, Problem) {
    match err {
        ConfigError::Invalid {
            field,
            origin,
            problem,
        } => (field, origin, problem),
        other => panic!("expected an invalid value, got {other:?}"),
    }
}

#[test]
fn tls_settings_load_from_the_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("config-ca");
    ca.write(&dir.path().join("ca.pem"));
    let pin = ca.server_cert().pin_hex();
    // Relative to the file's directory.
    let c = load(
        dir.path(),
        &format!("tls_ca_file = \"ca.pem\"\ntls_pin_sha256 = [\"{pin}\"]"),
        |_| None,
    )
    .unwrap();
    assert_eq!(c.tls.ca_file, Some(dir.path().join("ca.pem")));
    assert_eq!(c.tls.pins.len(), 1);
    assert!(c.tls.client_config().is_some());

    let env_ca = dir.path().join("env-ca.pem");
    ca.write(&env_ca);
    let c = load(
        dir.path(),
        "",
        env(&[
            ("AGENT_TLS_CA_FILE", env_ca.to_str().unwrap()),
            ("AGENT_TLS_PIN_SHA256", &format!("{pin}, {pin}")),
        ]),
    )
    .unwrap();
    assert_eq!(c.tls.ca_file, Some(env_ca));
    assert_eq!(c.tls.pins.len(), 2);

    // ws:// only: nothing to set up.
    let plain = "node_id = \"n1\"\ntoken = \"t\"\ngateways = [\"ws://127.0.0.1:1/ws\"]\noutbox_path = \"o\"\n";
    let c = AgentConfig::from_toml(plain, &dir.path().join("x.toml"), |_| None).unwrap();
    assert!(c.tls.client_config().is_none());
}

#[test]
fn tls_errors_name_the_setting_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");

    let (field, origin, problem) =
        invalid(load(dir.path(), "tls_ca_file = \"missing.pem\"", |_| None).unwrap_err());
    assert_eq!(
        (field, &origin),
        ("tls_ca_file", &Origin::File(file.clone()))
    );
    assert!(problem.to_string().contains("missing.pem"), "{problem}");

    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    let err = load(
        dir.path(),
        "",
        env(&[(
            "AGENT_TLS_CA_FILE",
            dir.path().join("junk.pem").to_str().unwrap(),
        )]),
    )
    .unwrap_err();
    let text = err.to_string();
    let (field, origin, _) = invalid(err);
    assert_eq!(
        (field, origin),
        ("tls_ca_file", Origin::Env("AGENT_TLS_CA_FILE"))
    );
    assert!(text.contains("no PEM certificate"), "{text}");

    let (field, origin, problem) =
        invalid(load(dir.path(), "tls_pin_sha256 = [\"abc\"]", |_| None).unwrap_err());
    assert_eq!((field, &origin), ("tls_pin_sha256", &Origin::File(file)));
    assert!(matches!(problem, Problem::Pin(_)), "{problem:?}");

    let (field, origin, _) =
        invalid(load(dir.path(), "", env(&[("AGENT_TLS_PIN_SHA256", "zz")])).unwrap_err());
    assert_eq!(
        (field, origin),
        ("tls_pin_sha256", Origin::Env("AGENT_TLS_PIN_SHA256"))
    );

    // Pins with no wss:// gateway would check nothing: refused rather than ignored.
    let pin = "00".repeat(32);
    let (field, _, problem) = invalid(
        load(
            dir.path(),
            "",
            env(&[
                ("AGENT_GATEWAYS", "ws://127.0.0.1:1/ws"),
                ("AGENT_TLS_PIN_SHA256", &pin),
            ]),
        )
        .unwrap_err(),
    );
    assert_eq!(field, "tls_pin_sha256");
    assert!(matches!(problem, Problem::PinsWithoutTls), "{problem:?}");
}
