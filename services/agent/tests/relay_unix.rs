//! Relays on a unix socket (`relay_listen = "unix:/path"`, ADR 0015): a real nats-server,
//! a real gateway, a real relay agent and a real downstream agent reaching it with
//! `via=unix:/path`, plus the agent binary as a process for what happens to the socket
//! file across runs: created 0660, a live one refused, a stale one (left by kill -9)
//! replaced, the file removed at exit, and a file that is not a socket left alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent::{AgentConfig, AgentHandle, RunError};
use futures_util::StreamExt;
use messages::command::CommandSigner;
use messages::envelope::PushEnvelope;
use messages::fleet::{self, Outcome, Register, Task, TaskKind, TaskResult};
use messages::payload::{from_bus, to_bus};
use messages::{BodyCodec, ClientKind, Route, UserId, subject};
use testkit::NatsServer;
use testkit::agent::AgentToml;

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(20);

/// An agent configuration in `dir` for `node` with its gateway URLs and extra TOML lines.
fn agent_config(dir: &Path, node: &str, gateways: &[String], extra: &str) -> AgentConfig {
    let text = AgentToml::new(node)
        .gateways(gateways)
        .line(r#"allowed_commands = ["echo", "sh"]"#)
        .line(extra)
        .render(dir);
    AgentConfig::from_toml(&text, &dir.join(format!("{node}.toml")), |_| None).unwrap()
}

/// Waits until something accepts connections on the socket file at `path`.
async fn wait_listening(path: &Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::UnixStream::connect(path).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {} within {WAIT:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mode(path: &Path) -> u32 {
    let meta = std::fs::symlink_metadata(path).unwrap();
    assert!(
        meta.file_type().is_socket(),
        "{} is a socket",
        path.display()
    );
    meta.permissions().mode() & 0o7777
}

async fn stop(mut agent: AgentHandle) {
    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
}

/// Waits for the next message on `route` from any of `nodes` (as the gateway stamped the
/// sender); returns the sender and the body.
async fn next_from(
    sub: &mut async_nats::Subscriber,
    route: &str,
    nodes: &[&str],
) -> (String, bytes::Bytes) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no {route} from {nodes:?} within {WAIT:?}"))
            .unwrap();
        if !msg.subject.as_str().ends_with(route) {
            continue;
        }
        let from = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(messages::headers::USER_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        if nodes.contains(&from.as_str()) {
            return (from, msg.payload);
        }
    }
}

/// Pushes a command task to `node` as the scheduler does: signed with the test command key,
/// on the node's agent channel.
async fn push_task(nats: &async_nats::Client, node: &str, task_id: u64, argv: &[&str]) {
    let task = Task {
        task_id,
        attempt: 1,
        spec: TaskKind::Command {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: Default::default(),
            cwd: None,
        },
        timeout_ms: 10_000,
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let signer = CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap();
    let (signed, _) = signer
        .sign(
            node,
            fleet::down::TASK,
            to_bus(&task).unwrap(),
            now_ms,
            60_000,
        )
        .unwrap();
    let push = PushEnvelope::new(
        task_id,
        Route::new(fleet::down::TASK).unwrap(),
        BodyCodec::MsgPack,
    );
    let node = UserId::new(node).unwrap();
    nats.publish_with_headers(subject::agent(&node), push.to_headers(), signed.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
}

/// The gateway's value of metric `name`.
async fn gateway_metric(gateway: &ws_gateway::Handle, name: &str) -> f64 {
    let r = testkit::http::get(gateway.addr(), "/metrics", "")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_behind_a_unix_socket_relay_registers_and_runs_a_task() {
    let nats = NatsServer::start().unwrap();
    let bus = async_nats::connect(nats.url()).await.unwrap();
    let mut up = bus
        .subscribe(subject::upstream_wildcard(ClientKind::Agent))
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let gateway = testkit::gateway::start(testkit::gateway::config(&nats.url(), "gw-unix")).await;
    let url = format!("ws://127.0.0.1:{}/ws", gateway.addr().port());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("relay.sock");

    // Plain ws:// through a relay must be allowed explicitly (one machine, a test).
    let relay = agent::start(agent_config(
        dir.path(),
        "relay-u",
        std::slice::from_ref(&url),
        &format!(
            "relay_listen = \"unix:{}\"\ninsecure_relay = true",
            socket.display()
        ),
    ))
    .await
    .unwrap();
    assert_eq!(relay.relay_addr(), None, "no TCP address: a socket file");
    assert_eq!(mode(&socket), 0o660);

    let via = format!("{url}?via=unix:{}", socket.display());
    let down = agent::start(agent_config(
        dir.path(),
        "down-u",
        &[via],
        "insecure_relay = true",
    ))
    .await
    .unwrap();

    // Both register: the downstream with its own token through the socket, the relay's own
    // session through its own socket too.
    let mut waiting = vec!["down-u", "relay-u"];
    while !waiting.is_empty() {
        let (node, body) = next_from(&mut up, fleet::up::REGISTER, &waiting).await;
        let register: Register = from_bus(&body).unwrap();
        assert_eq!(register.node_id, node);
        waiting.retain(|n| *n != node);
    }
    // One relay connection carries both sessions: the gateway holds one socket for both.
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway_metric(&gateway, "ws_gateway_relay_streams").await != 2.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relays {} streams {}",
            gateway_metric(&gateway, "ws_gateway_relays").await,
            gateway_metric(&gateway, "ws_gateway_relay_streams").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gateway_metric(&gateway, "ws_gateway_relays").await, 1.0);

    // A task for the downstream comes down through the relay and its result goes up.
    push_task(&bus, "down-u", 41, &["sh", "-c", "echo via $0", "unix"]).await;
    let result: TaskResult =
        from_bus(&next_from(&mut up, fleet::up::RESULT, &["down-u"]).await.1).unwrap();
    assert_eq!(result.task_id, 41);
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert!(result.stdout_tail.contains("via unix"), "{result:?}");
    // And one for the relay itself, whose session runs through its own socket.
    push_task(&bus, "relay-u", 42, &["echo", "relay"]).await;
    let result: TaskResult =
        from_bus(&next_from(&mut up, fleet::up::RESULT, &["relay-u"]).await.1).unwrap();
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");

    stop(down).await;
    stop(relay).await;
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the relay removes its socket file when it stops"
    );
    gateway.shutdown().await.unwrap();
}

/// A relay agent process on `socket` (its gateway never answers: the socket file is what
/// is watched here), started under `umask`; with `stderr`, its log is kept to read a
/// refusal.
fn spawn_relay(dir: &Path, node: &str, socket: &Path, umask: &str, stderr: bool) -> Child {
    let config = dir.join(format!("{node}.toml"));
    std::fs::write(
        &config,
        AgentToml::new(node)
            .gateway("ws://127.0.0.1:9/ws")
            .line(format!("relay_listen = \"unix:{}\"", socket.display()))
            .render(dir),
    )
    .unwrap();
    // exec: the child is the agent itself, so its pid takes the signal.
    Command::new("sh")
        .arg("-c")
        .arg(format!("umask {umask} && exec \"$0\" \"$1\""))
        .arg(env!("CARGO_BIN_EXE_agent"))
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(if stderr {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap()
}

/// Waits until process `pid` has a handler for SIGTERM (its `SigCgt` mask in /proc).
async fn catches_sigterm(pid: u32) {
    let term_bit = 1u64 << (rustix::process::Signal::TERM.as_raw() - 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .unwrap_or(0);
        if caught & term_bit != 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} never caught SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `child` to exit; its exit code and stderr.
async fn exited(child: Child) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("the agent process exits")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_refused_a_stale_one_replaced_and_the_file_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("relay.sock");

    let mut first = spawn_relay(dir.path(), "relay-1", &socket, "000", false);
    wait_listening(&socket).await;
    assert_eq!(mode(&socket), 0o660);

    // A second relay on the same path: another relay runs there, so it refuses to start
    // (EX_CONFIG) and leaves the live socket alone.
    let (code, stderr) = exited(spawn_relay(dir.path(), "relay-2", &socket, "022", true)).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("relay_listen") && stderr.contains("another process is listening"),
        "{stderr}"
    );
    tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the first relay still listens");

    // kill -9 leaves the file behind with nothing listening: a stale socket.
    first.kill().unwrap();
    first.wait().unwrap();
    let stale = tokio::net::UnixStream::connect(&socket).await.unwrap_err();
    assert_eq!(stale.kind(), std::io::ErrorKind::ConnectionRefused);

    // The next relay replaces it, and removes it when asked to stop (SIGTERM). Its mode
    // is 0660 whatever the umask: nothing more under umask 000 above, nothing less here.
    let third = spawn_relay(dir.path(), "relay-3", &socket, "077", false);
    wait_listening(&socket).await;
    assert_eq!(mode(&socket), 0o660);
    // The socket is bound before the agent installs its signal handlers; a SIGTERM sent
    // in between would kill it the default way.
    catches_sigterm(third.id()).await;
    let pid = rustix::process::Pid::from_raw(i32::try_from(third.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (code, stderr) = exited(third).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "the socket file is removed at exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_a_socket_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("relay.sock");
    std::fs::write(&path, "someone's file").unwrap();
    let config = agent_config(
        dir.path(),
        "relay-f",
        &["ws://127.0.0.1:9/ws".to_owned()],
        &format!("relay_listen = \"unix:{}\"", path.display()),
    );
    let err = agent::start(config).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RunError::RelayListen { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 78);
    assert!(
        msg.contains("relay_listen") && msg.contains("not a socket"),
        "{msg}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone's file");
}

/// The relay removes its socket file when it stops, but not a file that has since taken
/// its place (another relay's, say).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_removes_only_its_own_socket_file() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("relay.sock");
    let start = |node: &str| {
        agent::start(agent_config(
            dir.path(),
            node,
            &["ws://127.0.0.1:9/ws".to_owned()],
            &format!("relay_listen = \"unix:{}\"", socket.display()),
        ))
    };
    let relay = start("relay-a").await.unwrap();
    wait_listening(&socket).await;
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    stop(relay).await;
    tokio::net::UnixStream::connect(&socket)
        .await
        .expect("the other listener's file is still there");
    drop(other);

    // The file left behind is stale now; a relay takes it over and removes it at stop.
    let relay = start("relay-b").await.unwrap();
    wait_listening(&socket).await;
    stop(relay).await;
    assert!(std::fs::symlink_metadata(&socket).is_err());
}
