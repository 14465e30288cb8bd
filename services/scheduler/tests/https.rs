//! The scheduler's API over HTTPS and `schedctl` speaking it: the real scheduler binary
//! with `SCHEDULER_TLS_CERT`/`SCHEDULER_TLS_KEY` from a test CA (on a real nats-server),
//! and the real `schedctl` binary trusting that CA with `--cacert`/`SCHEDULER_CACERT`, or
//! refusing the certificate with a clear error when it does not. The task runs on a real
//! agent that reaches a real gateway over `wss://` (a TLS-terminating test proxy in front
//! of it), so every hop of an operator's command outside the bus is TLS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::process::{Process, free_addr};
use testkit::tls::{TestCa, TlsProxy};

const KEY: &str = "https-api-key-0123456789";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the real `schedctl` (off the async threads) against `url`, trusting `cacert` if
/// given.
async fn schedctl(url: &str, cacert: Option<&Path>, args: &[&str]) -> Out {
    let (url, cacert) = (url.to_owned(), cacert.map(Path::to_path_buf));
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || schedctl_blocking(&url, cacert, &args))
        .await
        .unwrap()
}

fn schedctl_blocking(url: &str, cacert: Option<PathBuf>, args: &[String]) -> Out {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_schedctl"));
    command
        .env("SCHEDULER_URL", url)
        .env("SCHEDULER_API_KEY", KEY)
        .env_remove("SCHEDULER_CACERT")
        .args(args);
    if let Some(ca) = cacert {
        command.env("SCHEDULER_CACERT", ca);
    }
    let out = command.output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A gateway behind a TLS proxy presenting a certificate of `ca`, and an agent (labelled
/// `region=tls`) that trusts `ca_file` and reaches the gateway over `wss://`.
struct TlsAgent {
    gateway: ws_gateway::Handle,
    _proxy: TlsProxy,
    node: agent::AgentHandle,
}

async fn tls_agent(nats_url: &str, ca: &TestCa, dir: &Path) -> TlsAgent {
    let gateway = testkit::gateway::start(testkit::gateway::config(nats_url, "gw-https")).await;
    let proxy = TlsProxy::start(&ca.server_cert(), gateway.addr())
        .await
        .unwrap();
    let text = AgentToml::new("edge-tls")
        .gateway(format!("wss://localhost:{}/ws", proxy.addr().port()))
        .line(r#"tls_ca_file = "ca.pem""#)
        .line(r#"allowed_commands = ["echo"]"#)
        .label("region", "tls")
        .render(dir);
    let config = agent::AgentConfig::from_toml(&text, &dir.join("agent.toml"), |_| None).unwrap();
    TlsAgent {
        gateway,
        _proxy: proxy,
        node: agent::start(config).await.unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedctl_lists_agents_and_runs_tasks_over_https_with_the_private_ca() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("scheduler-test-ca");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let (cert, key) = ca.server_cert().write(dir.path(), "scheduler");
    let command_key = dir.path().join("command.key");
    std::fs::write(&command_key, testkit::ws::TEST_COMMAND_KEY).unwrap();
    let addr = free_addr();
    let scheduler = Process::start(
        Path::new(env!("CARGO_BIN_EXE_scheduler")),
        &[],
        &[
            ("SCHEDULER_LISTEN", addr.to_string()),
            ("SCHEDULER_NATS_URL", nats.url()),
            ("SCHEDULER_API_KEYS", KEY.into()),
            (
                "SCHEDULER_DB",
                dir.path().join("s.redb").display().to_string(),
            ),
            (
                "SCHEDULER_COMMAND_KEY_FILE",
                command_key.display().to_string(),
            ),
            ("SCHEDULER_TLS_CERT", cert.display().to_string()),
            ("SCHEDULER_TLS_KEY", key.display().to_string()),
            ("RUST_LOG", "warn".into()),
        ],
        dir.path().join("scheduler.log"),
    );
    // The certificate names localhost and 127.0.0.1; use the DNS name.
    let url = format!("https://localhost:{}", addr.port());
    let mut edge = tls_agent(&nats.url(), &ca, dir.path()).await;

    // Until the scheduler is active (it stands by for the lease first) and the agent has
    // registered, retry.
    let deadline = Instant::now() + Duration::from_secs(30);
    let agents = loop {
        let out = schedctl(&url, Some(&ca_file), &["agents"]).await;
        if (out.code == 0 && out.stdout.contains("online")) || Instant::now() >= deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        agents.code,
        0,
        "{}{}\n{}",
        agents.stdout,
        agents.stderr,
        scheduler.log()
    );
    assert!(agents.stdout.starts_with("NODE"), "{}", agents.stdout);
    assert!(
        agents.stdout.contains("edge-tls") && agents.stdout.contains("region=tls"),
        "{}",
        agents.stdout
    );

    let run = schedctl(
        &url,
        Some(&ca_file),
        &[
            "run",
            "--label",
            "region=tls",
            "--wait",
            "--",
            "echo",
            "over-tls",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("succeeded") && run.stdout.contains("over-tls"),
        "{}",
        run.stdout
    );

    // The operator console over HTTPS: the session cookie is also `Secure`.
    let client = servicekit::http_client::client(servicekit::http_client::ClientOptions {
        roots: servicekit::tls::roots_from_file(&ca_file).unwrap(),
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .unwrap();
    let login = client
        .post(format!("{url}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 303);
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/console", "Secure"] {
        assert!(cookie.contains(attr), "{cookie}");
    }

    // Without the private CA (the system's store) and with another CA: refused, with the
    // certificate problem and the remedy named, exit 69.
    let other = dir.path().join("other-ca.pem");
    TestCa::new("other-ca").write(&other);
    for cacert in [None, Some(other.as_path())] {
        let out = schedctl(&url, cacert, &["agents"]).await;
        assert_eq!(out.code, 69, "{cacert:?}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("TLS handshake failed")
                && out.stderr.contains("not signed by a trusted CA")
                && out.stderr.contains("--cacert"),
            "{cacert:?}: {}",
            out.stderr
        );
    }

    // A CA file that cannot be read is a usage error, named as such.
    let out = schedctl(&url, Some(Path::new("/nonexistent/ca.pem")), &["agents"]).await;
    assert_eq!(out.code, 64, "{}", out.stderr);
    assert!(out.stderr.contains("/nonexistent/ca.pem"), "{}", out.stderr);

    edge.node.stop();
    let _ = edge.node.join().await;
    drop(scheduler);
    edge.gateway.shutdown().await.unwrap();
}
