//! The agent against a real nats-server, a real gateway and a fake scheduler (plain
//! async-nats in the test): registration, command tasks, the allowlist, timeouts, and outbox
//! replay after the gateway was down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent::{AgentConfig, AgentHandle};
use bytes::Bytes;
use futures_util::StreamExt;
use messages::command::CommandSigner;
use messages::envelope::{AgentClose, PushEnvelope};
use messages::fleet::{
    self, Ack, Cancel, Outcome, Register, Task, TaskKind, TaskResult, TaskStarted,
};
use messages::payload::{GatewayControl, HeartbeatParams, SessionEvent, from_bus, to_bus};
use messages::subject::{self, Event};
use messages::{BodyCodec, ClientKind, CloseCode, Route};
use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::ws::token;
use tokio::sync::mpsc;

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(15);

fn gateway_config(nats: &str, name: &str) -> ws_gateway::Config {
    testkit::gateway::config(nats, name)
}

async fn gateway_on(nats: &str, name: &str, listener: TcpListener) -> ws_gateway::Handle {
    spawn_gateway(gateway_config(nats, name), listener).await
}

async fn spawn_gateway(config: ws_gateway::Config, listener: TcpListener) -> ws_gateway::Handle {
    testkit::gateway::start_on(config, listener).await
}

/// Binds `addr` again after a gateway on it stopped (retrying while the port frees up).
async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..200 {
        if let Ok(l) = TcpListener::bind(addr) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cannot bind {addr} again");
}

fn agent_config(dir: &Path, gateway: SocketAddr) -> AgentConfig {
    agent_config_many(dir, &[gateway])
}

fn agent_config_many(dir: &Path, gateways: &[SocketAddr]) -> AgentConfig {
    let urls: Vec<String> = gateways.iter().map(|g| format!("ws://{g}/ws")).collect();
    let text = AgentToml::new("node-1")
        .gateways(&urls)
        .outbox("outbox.redb")
        .line(r#"allowed_commands = ["echo", "sleep", "sh"]"#)
        .label("role", "test")
        .render(dir);
    AgentConfig::from_toml(&text, &dir.join("agent.toml"), |_| None).unwrap()
}

/// A stand-in for the scheduler: records what agents publish, acks every result, and
/// pushes tasks the way the real one will (headers on `ws.user.<node>`).
struct Scheduler {
    nats: async_nats::Client,
    received: mpsc::UnboundedReceiver<(String, Bytes)>,
    next_push: u64,
    /// Whether results are acknowledged (on by default).
    acking: Arc<AtomicBool>,
}

impl Scheduler {
    async fn start(url: &str) -> Scheduler {
        let nats = async_nats::connect(url).await.unwrap();
        let mut sub = nats.subscribe("ws.msg.agent.>").await.unwrap();
        nats.flush().await.unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let acker = nats.clone();
        let acking = Arc::new(AtomicBool::new(true));
        let ack_results = Arc::clone(&acking);
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let route = msg
                    .subject
                    .as_str()
                    .strip_prefix("ws.msg.agent.")
                    .unwrap_or_default()
                    .to_owned();
                if route == fleet::up::RESULT && ack_results.load(Ordering::SeqCst) {
                    let result: TaskResult = from_bus(&msg.payload).unwrap();
                    let ack = Ack {
                        message_ids: vec![result.message_id],
                    };
                    push_to(&acker, 0, fleet::down::ACK, to_bus(&ack).unwrap()).await;
                }
                if tx.send((route, msg.payload)).is_err() {
                    break;
                }
            }
        });
        Scheduler {
            nats,
            received,
            next_push: 1,
            acking,
        }
    }

    async fn push_task(&mut self, task_id: u64, spec: TaskKind, timeout_ms: u64) {
        let task = Task {
            task_id,
            attempt: 1,
            spec,
            timeout_ms,
        };
        self.next_push += 1;
        push_to(
            &self.nats,
            self.next_push,
            fleet::down::TASK,
            to_bus(&task).unwrap(),
        )
        .await;
    }

    /// The next message on `route` (skipping others), or a panic after [`WAIT`].
    async fn expect(&mut self, route: &str) -> Bytes {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.received.recv()).await {
                Ok(Some((r, payload))) if r == route => return payload,
                Ok(Some(_)) => {}
                Ok(None) => panic!("scheduler subscription ended"),
                Err(_) => panic!("nothing on {route} within {WAIT:?}"),
            }
        }
    }

    /// The started notice of `task_id` (skipping other messages).
    async fn started(&mut self, task_id: u64) -> TaskStarted {
        loop {
            let started: TaskStarted = from_bus(&self.expect(fleet::up::STARTED).await).unwrap();
            if started.task_id == task_id {
                return started;
            }
        }
    }

    async fn push_cancel(&mut self, task_id: u64) {
        self.next_push += 1;
        push_to(
            &self.nats,
            self.next_push,
            fleet::down::CANCEL,
            to_bus(&Cancel { task_id }).unwrap(),
        )
        .await;
    }

    /// The result of `task_id` (skipping other messages).
    async fn result(&mut self, task_id: u64) -> TaskResult {
        loop {
            let result: TaskResult = from_bus(&self.expect(fleet::up::RESULT).await).unwrap();
            if result.task_id == task_id {
                return result;
            }
        }
    }

    /// Routes received so far without waiting.
    fn drain(&mut self) -> Vec<(String, Bytes)> {
        let mut out = Vec::new();
        while let Ok(m) = self.received.try_recv() {
            out.push(m);
        }
        out
    }
}

/// Pushes `body` to node-1 as the scheduler does: signed with the test command key, on
/// the node's agent channel.
async fn push_to(nats: &async_nats::Client, msg_id: u64, route: &str, body: Vec<u8>) {
    let signer = CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap();
    let (signed, _) = signer
        .sign("node-1", route, body, unix_ms(), 60_000)
        .unwrap();
    push_raw(nats, msg_id, route, signed).await;
}

/// Publishes `body` on node-1's agent channel as it is (forgeries, replays).
async fn push_raw(nats: &async_nats::Client, msg_id: u64, route: &str, body: Vec<u8>) {
    let push = PushEnvelope::new(msg_id, Route::new(route).unwrap(), BodyCodec::MsgPack);
    nats.publish_with_headers("ws.agent.node-1", push.to_headers(), body.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn command(argv: &[&str]) -> TaskKind {
    TaskKind::Command {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: Default::default(),
        cwd: None,
    }
}

async fn outbox_len(agent: &AgentHandle) -> u64 {
    let outbox = agent.outbox().clone();
    tokio::task::spawn_blocking(move || outbox.len().unwrap())
        .await
        .unwrap()
}

async fn wait_outbox_len(agent: &AgentHandle, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while outbox_len(agent).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox never reached {want} entries (has {})",
            outbox_len(agent).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_runs_tasks_and_clears_acked_results() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let gw = gateway_on(
        &nats.url(),
        "gw-a",
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config(dir.path(), gw.addr()))
        .await
        .unwrap();

    let register: Register = from_bus(&scheduler.expect(fleet::up::REGISTER).await).unwrap();
    assert_eq!(register.node_id, "node-1");
    assert_eq!(
        register.labels.get("role").map(String::as_str),
        Some("test")
    );
    assert!(!register.hostname.is_empty());
    assert_eq!(register.addresses, vec!["127.0.0.1".to_owned()]);

    // An allowlisted command: started, then a result with its output and exit code.
    scheduler
        .push_task(1, command(&["echo", "hello"]), 10_000)
        .await;
    let started = scheduler.started(1).await;
    assert_eq!((started.task_id, started.attempt), (1, 1));
    let result = scheduler.result(1).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert_eq!(result.exit_code, Some(0));
    assert!(result.stdout_tail.contains("hello"), "{result:?}");
    assert!(agent::MessageId::parse(&result.message_id).is_some());

    // Not on the allowlist: refused without running.
    scheduler
        .push_task(2, command(&["rm", "-rf", "/tmp/nothing-here"]), 10_000)
        .await;
    let result = scheduler.result(2).await;
    assert_eq!(result.outcome, Outcome::Failed);
    assert_eq!(
        result.error.as_deref(),
        Some("refused: program \"rm\" is not on allowed_commands")
    );

    // Past its timeout: killed and reported as timed out.
    scheduler.push_task(3, command(&["sleep", "30"]), 300).await;
    let result = scheduler.result(3).await;
    assert_eq!(result.outcome, Outcome::TimedOut, "{result:?}");

    // Cancelled by id while running: the whole process group is killed.
    scheduler
        .push_task(4, command(&["sh", "-c", "sleep 30"]), 60_000)
        .await;
    scheduler.started(4).await;
    scheduler.push_cancel(4).await;
    let result = scheduler.result(4).await;
    assert_eq!(result.outcome, Outcome::Cancelled, "{result:?}");

    // The scheduler acked every result, so the outbox empties.
    wait_outbox_len(&agent, 0).await;

    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_produced_while_the_gateway_is_down_arrive_once_after_it_returns() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let gw = gateway_on(
        &nats.url(),
        "gw-a",
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await;
    let addr = gw.addr();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config(dir.path(), addr)).await.unwrap();
    scheduler.expect(fleet::up::REGISTER).await;

    // A task that finishes only when the test says so, which is after the gateway is gone.
    let go = dir.path().join("go");
    let script = format!(
        "while [ ! -e '{}' ]; do sleep 0.05; done; echo late",
        go.display()
    );
    scheduler
        .push_task(10, command(&["sh", "-c", &script]), 60_000)
        .await;
    scheduler.started(10).await;

    gw.shutdown().await.unwrap();
    std::fs::write(&go, b"").unwrap();
    // The result is written to the outbox although nothing can be sent.
    wait_outbox_len(&agent, 1).await;
    let pending = {
        let outbox = agent.outbox().clone();
        tokio::task::spawn_blocking(move || outbox.pending(10).unwrap())
            .await
            .unwrap()
    };
    let id = pending[0].id.to_string();
    assert!(
        !scheduler
            .drain()
            .iter()
            .any(|(route, _)| route == fleet::up::RESULT),
        "no result can have been delivered while the gateway was down"
    );

    // The gateway comes back on the same address: the agent reconnects, registers and
    // replays; the scheduler's ack empties the outbox.
    let gw = gateway_on(&nats.url(), "gw-b", rebind(addr).await).await;
    scheduler.expect(fleet::up::REGISTER).await;
    let result = scheduler.result(10).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert!(result.stdout_tail.contains("late"), "{result:?}");
    assert_eq!(result.message_id, id);
    wait_outbox_len(&agent, 0).await;

    // Once: with the entry acked, nothing sends it again (bounded quiet period, then check
    // everything that arrived meanwhile).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = scheduler
        .drain()
        .into_iter()
        .filter(|(route, _)| route == fleet::up::RESULT)
        .count();
    assert_eq!(again, 0, "the result was delivered more than once");

    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    gw.shutdown().await.unwrap();
}

/// A gateway URL with an IPv6 literal (`ws://[::1]:port/ws`) is dialled directly: the
/// agent registers through it, reports its IPv6 address, and runs a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_through_a_gateway_at_an_ipv6_literal() {
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    };
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let gw = gateway_on(&nats.url(), "gw-v6", listener).await;
    assert!(gw.addr().is_ipv6());
    let dir = tempfile::tempdir().unwrap();
    let config = agent_config(dir.path(), gw.addr());
    assert_eq!(
        config.gateways[0].to_string(),
        format!("ws://[::1]:{}/ws", gw.addr().port())
    );
    let mut agent = agent::start(config).await.unwrap();
    let register: Register = from_bus(&scheduler.expect(fleet::up::REGISTER).await).unwrap();
    assert_eq!(register.addresses, vec!["::1".to_owned()]);
    scheduler
        .push_task(1, command(&["echo", "over v6"]), 10_000)
        .await;
    let result = scheduler.result(1).await;
    assert_eq!(result.outcome, Outcome::Succeeded, "{result:?}");
    assert!(result.stdout_tail.contains("over v6"), "{result:?}");

    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_other_gateway() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let mut connects = scheduler
        .nats
        .subscribe(subject::event(ClientKind::Agent, Event::Connect))
        .await
        .unwrap();
    scheduler.nats.flush().await.unwrap();
    let url = nats.url();
    let (gw_a, gw_b) = tokio::join!(
        gateway_on(&url, "gw-a", TcpListener::bind("127.0.0.1:0").unwrap()),
        gateway_on(&url, "gw-b", TcpListener::bind("127.0.0.1:0").unwrap()),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config_many(dir.path(), &[gw_a.addr(), gw_b.addr()]))
        .await
        .unwrap();
    scheduler.expect(fleet::up::REGISTER).await;
    let session = next_connect(&mut connects).await;

    // Take down the replica the agent is on: it must register through the other one.
    let gone_name = session.gateway.as_str().to_owned();
    let (gone, other) = if gone_name == "gw-a" {
        (gw_a, gw_b)
    } else {
        (gw_b, gw_a)
    };
    gone.shutdown().await.unwrap();
    scheduler.expect(fleet::up::REGISTER).await;
    let expected = if gone_name == "gw-a" { "gw-b" } else { "gw-a" };
    assert_eq!(next_connect(&mut connects).await.gateway.as_str(), expected);
    scheduler
        .push_task(20, command(&["echo", "still here"]), 10_000)
        .await;
    let result = scheduler.result(20).await;
    assert!(result.stdout_tail.contains("still here"), "{result:?}");

    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    other.shutdown().await.unwrap();
}

async fn next_connect(connects: &mut async_nats::Subscriber) -> SessionEvent {
    let msg = tokio::time::timeout(WAIT, connects.next())
        .await
        .unwrap()
        .unwrap();
    from_bus(&msg.payload).unwrap()
}

/// The next refusal report (skipping other messages).
async fn next_refusal(scheduler: &mut Scheduler) -> fleet::Refused {
    from_bus(&scheduler.expect(fleet::up::REFUSED).await).unwrap()
}

fn task_body(task_id: u64) -> Vec<u8> {
    to_bus(&Task {
        task_id,
        attempt: 1,
        spec: command(&["echo", "hi"]),
        timeout_ms: 5_000,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signed_commands_on_the_agent_channel_make_the_agent_act() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let mut connects = scheduler
        .nats
        .subscribe(subject::event(ClientKind::Agent, Event::Connect))
        .await
        .unwrap();
    scheduler.nats.flush().await.unwrap();
    let gw = gateway_on(
        &nats.url(),
        "gw-a",
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config(dir.path(), gw.addr()))
        .await
        .unwrap();
    scheduler.expect(fleet::up::REGISTER).await;
    let session = next_connect(&mut connects).await;

    // What any product service can send never reaches the agent: a push to the user
    // subject of the node id, a socket-addressed push, a kick through gateway control.
    let signer = CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap();
    let (signed, _) = signer
        .sign(
            "node-1",
            fleet::down::TASK,
            task_body(900),
            unix_ms(),
            60_000,
        )
        .unwrap();
    let push = PushEnvelope {
        sockets: vec![session.socket_id],
        ..PushEnvelope::new(
            0,
            Route::new(fleet::down::TASK).unwrap(),
            BodyCodec::MsgPack,
        )
    };
    for subject in [
        "ws.user.node-1".to_owned(),
        subject::gateway_push(&session.gateway),
    ] {
        scheduler
            .nats
            .publish_with_headers(subject, push.to_headers(), signed.clone().into())
            .await
            .unwrap();
    }
    let kick = GatewayControl::Close {
        socket_id: session.socket_id,
        code: CloseCode::Kicked.code(),
        reason: "test".into(),
    };
    scheduler
        .nats
        .publish(
            subject::gateway_control(&session.gateway),
            to_bus(&kick).unwrap().into(),
        )
        .await
        .unwrap();
    scheduler.nats.flush().await.unwrap();

    // Forgeries on the agent channel itself are refused and reported, each for its reason.
    push_raw(&scheduler.nats, 2, fleet::down::TASK, task_body(901)).await;
    assert_eq!(next_refusal(&mut scheduler).await.reason, "unsigned");
    let stranger = CommandSigner::generate();
    let (foreign, _) = stranger
        .sign(
            "node-1",
            fleet::down::TASK,
            task_body(902),
            unix_ms(),
            60_000,
        )
        .unwrap();
    push_raw(&scheduler.nats, 3, fleet::down::TASK, foreign).await;
    let refused = next_refusal(&mut scheduler).await;
    assert_eq!(refused.reason, "unknown_key");
    assert_eq!(refused.task_id, Some(902));
    let (other_node, _) = signer
        .sign(
            "node-2",
            fleet::down::TASK,
            task_body(903),
            unix_ms(),
            60_000,
        )
        .unwrap();
    push_raw(&scheduler.nats, 4, fleet::down::TASK, other_node).await;
    assert_eq!(next_refusal(&mut scheduler).await.reason, "other_node");
    let (expired, _) = signer
        .sign(
            "node-1",
            fleet::down::TASK,
            task_body(904),
            unix_ms() - 600_000,
            1_000,
        )
        .unwrap();
    push_raw(&scheduler.nats, 5, fleet::down::TASK, expired).await;
    assert_eq!(next_refusal(&mut scheduler).await.reason, "expired");
    let (as_cancel, _) = signer
        .sign(
            "node-1",
            fleet::down::CANCEL,
            task_body(905),
            unix_ms(),
            60_000,
        )
        .unwrap();
    push_raw(&scheduler.nats, 6, fleet::down::TASK, as_cancel).await;
    assert_eq!(next_refusal(&mut scheduler).await.reason, "other_route");

    // The genuine command runs once; the same bytes again are a replay.
    let (genuine, _) = signer
        .sign(
            "node-1",
            fleet::down::TASK,
            task_body(906),
            unix_ms(),
            60_000,
        )
        .unwrap();
    push_raw(&scheduler.nats, 7, fleet::down::TASK, genuine.clone()).await;
    let result = scheduler.result(906).await;
    assert_eq!(result.stdout_tail.trim(), "hi");
    push_raw(&scheduler.nats, 8, fleet::down::TASK, genuine).await;
    let refused = next_refusal(&mut scheduler).await;
    assert_eq!(refused.reason, "replayed");
    assert_eq!(refused.task_id, Some(906));
    // Nothing but 906 ever ran: not the user-subject, socket-addressed or forged tasks.
    for (route, payload) in scheduler.drain() {
        if route == fleet::up::STARTED {
            let started: TaskStarted = from_bus(&payload).unwrap();
            assert_eq!(started.task_id, 906);
        }
    }
    assert_eq!(agent.metrics().commands_refused(), 6);
    assert!(
        agent.metrics().connected(),
        "the kick did not reach the agent"
    );

    // A revocation close (only the scheduler can publish on the agent channel) does not
    // stop the agent: it retries at the backoff cap and comes back once allowed.
    let map = AgentClose {
        code: CloseCode::Revoked,
    }
    .to_headers();
    scheduler
        .nats
        .publish_with_headers("ws.agent.node-1", map, Bytes::new())
        .await
        .unwrap();
    next_connect(&mut connects).await;
    scheduler.expect(fleet::up::REGISTER).await;
    agent.stop();
    assert!(matches!(
        tokio::time::timeout(WAIT, agent.join()).await.unwrap(),
        Ok(())
    ));
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_results_are_replayed_after_an_agent_restart() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    scheduler.acking.store(false, Ordering::SeqCst);
    let gw = gateway_on(
        &nats.url(),
        "gw-a",
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config(dir.path(), gw.addr()))
        .await
        .unwrap();
    scheduler.expect(fleet::up::REGISTER).await;
    scheduler
        .push_task(30, command(&["echo", "keep me"]), 10_000)
        .await;
    let first = scheduler.result(30).await;
    // Delivered but never acknowledged: it stays in the outbox across the restart.
    assert_eq!(outbox_len(&agent).await, 1);
    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    drop(agent);

    scheduler.acking.store(true, Ordering::SeqCst);
    let mut agent = agent::start(agent_config(dir.path(), gw.addr()))
        .await
        .unwrap();
    scheduler.expect(fleet::up::REGISTER).await;
    let replayed = scheduler.result(30).await;
    assert_eq!(replayed, first, "a replay is the same message, same id");
    wait_outbox_len(&agent, 0).await;

    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_follow_the_gateway_and_keep_the_session() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let mut disconnects = scheduler
        .nats
        .subscribe(subject::event(ClientKind::Agent, Event::Disconnect))
        .await
        .unwrap();
    scheduler.nats.flush().await.unwrap();
    // A session silent for interval + grace is closed: with these settings an agent that
    // did not beat (or did not follow the acks) would be dropped several times below.
    let mut config = gateway_config(&nats.url(), "gw-a");
    config.heartbeat = HeartbeatParams {
        base_ms: 200,
        step_ms: 100,
        max_ms: 400,
        grow_after: 2,
        grace_ms: 300,
    };
    let gw = spawn_gateway(config, TcpListener::bind("127.0.0.1:0").unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = agent::start(agent_config(dir.path(), gw.addr()))
        .await
        .unwrap();
    scheduler.expect(fleet::up::REGISTER).await;

    // Bounded observation window of many heartbeat periods: no disconnect, no re-register.
    let dropped = tokio::time::timeout(Duration::from_secs(3), disconnects.next()).await;
    assert!(dropped.is_err(), "the session was closed: {dropped:?}");
    assert!(
        !scheduler
            .drain()
            .iter()
            .any(|(route, _)| route == fleet::up::REGISTER),
        "the agent reconnected"
    );
    // And it still works.
    scheduler
        .push_task(40, command(&["echo", "ok"]), 10_000)
        .await;
    assert_eq!(scheduler.result(40).await.outcome, Outcome::Succeeded);

    agent.stop();
    tokio::time::timeout(WAIT, agent.join())
        .await
        .unwrap()
        .unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_are_averaged_outboxed_sent_and_cleared_by_acks() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    let gw = gateway_on(
        &nats.url(),
        "gw-reports",
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config(dir.path(), gw.addr());
    config.report_period = Duration::from_secs(1);
    let mut agent = agent::start(config).await.unwrap();
    scheduler.expect(fleet::up::REGISTER).await;

    let batch: fleet::ReportBatch = from_bus(&scheduler.expect(fleet::up::REPORT).await).unwrap();
    assert_eq!(batch.reports.len(), 1);
    let report = &batch.reports[0];
    for key in ["cpu_pct", "mem_pct", "disk_pct"] {
        let v = report.metrics[key];
        assert!((0.0..=100.0).contains(&v), "{key} = {v}");
    }
    assert!(
        report.message_id.contains('-'),
        "an outbox message id: {}",
        report.message_id
    );
    // Written to the outbox before it was sent; the scheduler's ack removes it.
    assert!(outbox_len(&agent).await >= 1);
    let ack = Ack {
        message_ids: vec![report.message_id.clone()],
    };
    push_to(&scheduler.nats, 0, fleet::down::ACK, to_bus(&ack).unwrap()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // Later reports may have been appended meanwhile; the acked one must be gone.
        let outbox = agent.outbox().clone();
        let id = report.message_id.clone();
        let still_there = tokio::task::spawn_blocking(move || {
            outbox
                .pending(1000)
                .unwrap()
                .iter()
                .any(|e| outbox.message_id(e.seq).to_string() == id)
        })
        .await
        .unwrap();
        if !still_there {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acked report never left the outbox"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop();
    let _ = agent.join().await;
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_survives_kill_9_of_the_agent_process_and_is_delivered_once() {
    let nats = NatsServer::start().unwrap();
    let mut scheduler = Scheduler::start(&nats.url()).await;
    scheduler.acking.store(false, Ordering::SeqCst);
    let gw = gateway_on(
        &nats.url(),
        "gw-kill",
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        format!(
            "node_id = \"node-1\"\ntoken = \"{}\"\ngateways = [\"ws://{}/ws\"]\noutbox_path = \"outbox.redb\"\nallowed_commands = [\"echo\"]\ncommand_keys_file = \"command.pub\"\n",
            token("node-1", Some("agent"), &[]),
            gw.addr()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("command.pub"),
        testkit::ws::TEST_COMMAND_PUBLIC,
    )
    .unwrap();
    let spawn_agent = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };

    // The result is written to the outbox and sent, but never acknowledged...
    let mut process = spawn_agent();
    scheduler.expect(fleet::up::REGISTER).await;
    scheduler
        .push_task(77, command(&["echo", "survive"]), 10_000)
        .await;
    let first = scheduler.result(77).await;
    // ...and the process dies with SIGKILL: no chance to flush or say goodbye.
    process.kill().unwrap();
    process.wait().unwrap();

    // The restarted agent replays it, with the same message id, and the ack clears it.
    scheduler.acking.store(true, Ordering::SeqCst);
    let mut process = spawn_agent();
    scheduler.expect(fleet::up::REGISTER).await;
    let replayed = scheduler.result(77).await;
    assert_eq!(
        replayed, first,
        "the same message, so the scheduler counts it once"
    );
    // Give the ack time to land, stop the agent, and look inside its outbox. If the ack had
    // not landed yet, the next run replays the result again: every copy must carry the same
    // message id (that is what makes the scheduler count it once).
    let outbox_path = dir.path().join("outbox.redb");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        process.kill().unwrap();
        process.wait().unwrap();
        for (route, body) in scheduler.drain() {
            if route == fleet::up::RESULT {
                let again: TaskResult = from_bus(&body).unwrap();
                assert_eq!(again.message_id, first.message_id);
            }
        }
        let path = outbox_path.clone();
        let left =
            tokio::task::spawn_blocking(move || agent::Outbox::open(path).unwrap().len().unwrap())
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the acked result never left the outbox"
        );
        process = spawn_agent();
        scheduler.expect(fleet::up::REGISTER).await;
    }
    gw.shutdown().await.unwrap();
}
