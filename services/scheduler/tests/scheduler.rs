//! The scheduler against a real nats-server and a real gateway, with a fake agent speaking
//! the fleet contract over a real WebSocket and an operator using the real HTTP API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use futures_util::StreamExt;
use messages::fleet::{self, AgentState};
use messages::payload::{self, HeartbeatBatch, SessionEvent};
use messages::subject::{self, Event};
use messages::{BodyCodec, ClientKind, Frame, FrameKind, GatewayId, Route, SocketId, UserId};
use serde::Serialize;
use serde_json::json;
use testkit::NatsServer;
use testkit::fleetbus::{agent_pushes, next_push as bus_push, publish_upstream as gateway_publish};
use testkit::http;
use testkit::ws::{TestClient, token};

const KEY: &str = "test-api-key-0123456789";
/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

async fn gateway(nats: &str) -> ws_gateway::Handle {
    testkit::gateway::start(testkit::gateway::config(nats, "gw-a")).await
}

fn scheduler_config(nats: &str, db: &std::path::Path) -> scheduler::Config {
    let mut config = scheduler::Config::new(nats, vec![KEY.to_owned()], db.join("s.redb"));
    config.command_key = std::sync::Arc::new(
        messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap(),
    );
    config.heartbeat = Duration::from_secs(1);
    config.sweep = Duration::from_millis(100);
    config.dispatch_timeout = Duration::from_secs(5);
    config
}

async fn scheduler(nats: &str, db: &std::path::Path) -> scheduler::Handle {
    start_scheduler(scheduler_config(nats, db)).await
}

async fn start_scheduler(config: scheduler::Config) -> scheduler::Handle {
    let handle = scheduler::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    wait_status(handle.addr(), "/readyz", 200).await;
    handle
}

/// Polls `path` until it answers `want`.
async fn wait_status(addr: SocketAddr, path: &str, want: u16) {
    http::wait_status(addr, path, want).await;
}

/// Polls until `check` accepts the JSON at `path`.
async fn eventually(
    addr: SocketAddr,
    path: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    http::eventually(addr, path, KEY, check).await
}

/// Sends an agent -> scheduler publish frame with a MessagePack body.
async fn send_up<T: Serialize>(agent: &mut TestClient, route: &str, body: &T) {
    let frame = Frame::new(FrameKind::Publish)
        .with_route(Route::new(route).unwrap())
        .with_body(BodyCodec::MsgPack, payload::to_bus(body).unwrap());
    agent.send(&frame).await;
}

/// The next push, which must have `route`; anything but heartbeat acks in between fails.
async fn next_push<T: serde::de::DeserializeOwned>(agent: &mut TestClient, route: &str) -> T {
    let f = tokio::time::timeout(WAIT, agent.frame())
        .await
        .expect("no push in time");
    assert_eq!(f.kind, FrameKind::Push, "{f:?}");
    assert_eq!(f.route.as_str(), route, "{f:?}");
    assert_eq!(f.flags.codec(), BodyCodec::MsgPack);
    assert_ne!(f.msg_id, 0);
    // Every push to an agent is a signed command for this node and route.
    let verifier =
        messages::command::CommandVerifier::from_pem(testkit::ws::TEST_COMMAND_PUBLIC).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let envelope = verifier.verify(&f.body, "node-1", route, now).unwrap();
    payload::from_bus(&envelope.body).unwrap()
}

fn register(labels: &[(&str, &str)]) -> fleet::Register {
    fleet::Register {
        node_id: "node-1".into(),
        hostname: "edge-1".into(),
        version: "0.1.0".into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        addresses: vec!["10.0.0.1".into()],
        configs: Default::default(),
    }
}

fn result(message_id: &str, task_id: u64) -> fleet::TaskResult {
    fleet::TaskResult {
        message_id: message_id.into(),
        task_id,
        attempt: 1,
        outcome: fleet::Outcome::Succeeded,
        exit_code: Some(0),
        stdout_tail: "up 3 days".into(),
        stderr_tail: String::new(),
        error: None,
        latency_ms: Some(4),
        http_status: None,
        finished_at_ms: 1_800_000_000_000,
        output_chunks: 0,
    }
}

async fn connect_agent(gw: SocketAddr) -> TestClient {
    TestClient::connect(gw, &token("node-1", Some("agent"), &[]))
        .await
        .unwrap()
}

#[tokio::test]
async fn register_task_result_ack_replay_and_offline_delivery() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&url).await;
    let sched = scheduler(&url, dir.path()).await;
    let api = sched.addr();
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    let mut states = bus.subscribe(fleet::STATE_WILDCARD).await.unwrap();
    bus.flush().await.unwrap();

    // Register: the agent appears online and a state change is announced.
    let mut agent = connect_agent(gw.addr()).await;
    send_up(
        &mut agent,
        fleet::up::REGISTER,
        &register(&[("region", "eu")]),
    )
    .await;
    let v = eventually(api, "/v1/agents/node-1", |v| v["state"] == "online").await;
    assert_eq!(v["labels"], json!({"region": "eu"}));
    assert_eq!(v["hostname"], "edge-1");
    let msg = tokio::time::timeout(WAIT, states.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.subject.as_str(), "fleet.agent.state.node-1");
    let change: fleet::StateChange = payload::from_bus(&msg.payload).unwrap();
    assert_eq!((change.from, change.to), (None, AgentState::Online));
    let list = http::get(api, "/v1/agents?label=region%3Deu&state=online", KEY)
        .await
        .unwrap();
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["agents"].as_array().map(Vec::len), Some(1));
    let none = http::get(api, "/v1/agents?label=region=us", KEY)
        .await
        .unwrap();
    assert_eq!(none.json()["agents"], json!([]));

    // A task for an online agent is pushed at once.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({
            "targets": {"nodes": ["node-1"]},
            "spec": {"kind": "command", "argv": ["uptime"]},
            "timeout_ms": 5000,
            "max_attempts": 2
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    assert_eq!(r.json()["dispatched"], 1);
    let task_id = r.json()["task_id"].as_u64().unwrap();
    let task: fleet::Task = next_push(&mut agent, fleet::down::TASK).await;
    assert_eq!(
        (task.task_id, task.attempt, task.timeout_ms),
        (task_id, 1, 5000)
    );
    assert_eq!(
        task.spec,
        fleet::TaskKind::Command {
            argv: vec!["uptime".into()],
            env: BTreeMap::new(),
            cwd: None
        }
    );
    let path = format!("/v1/tasks/{task_id}");
    eventually(api, &path, |v| {
        v["targets"]["node-1"]["state"] == "dispatched"
    })
    .await;

    // Started, then the result: acknowledged by message id and stored.
    send_up(
        &mut agent,
        fleet::up::STARTED,
        &fleet::TaskStarted {
            task_id,
            attempt: 1,
            at_ms: 1_800_000_000_000,
        },
    )
    .await;
    eventually(api, &path, |v| v["targets"]["node-1"]["state"] == "running").await;
    for (seq, offset, data) in [(0, 0, "up "), (1, 3, "3 days")] {
        send_up(
            &mut agent,
            fleet::up::OUTPUT,
            &fleet::TaskOutput {
                task_id,
                attempt: 1,
                seq,
                stream: fleet::Stream::Stdout,
                offset,
                data: data.into(),
            },
        )
        .await;
    }
    send_up(&mut agent, fleet::up::RESULT, &result("m-1", task_id)).await;
    let ack: fleet::Ack = next_push(&mut agent, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec!["m-1".to_owned()]);
    let v = eventually(api, &path, |v| {
        v["targets"]["node-1"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(v["results"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["results"][0]["body"]["stdout_tail"], "up 3 days");
    assert_eq!(v["finished"], true);
    // Frames of one connection arrive in order, so the chunks were handled before the result.
    assert_eq!(
        v["output"]["node-1"],
        json!([
            {"task_id": task_id, "attempt": 1, "seq": 0, "stream": "stdout", "offset": 0, "data": "up "},
            {"task_id": task_id, "attempt": 1, "seq": 1, "stream": "stdout", "offset": 3, "data": "3 days"}
        ])
    );

    // A replay (the agent lost the ack) is acknowledged again and never counted twice.
    send_up(&mut agent, fleet::up::RESULT, &result("m-1", task_id)).await;
    let ack: fleet::Ack = next_push(&mut agent, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec!["m-1".to_owned()]);
    let v = http::get(api, &path, KEY).await.unwrap().json();
    assert_eq!(v["results"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["targets"]["node-1"]["state"], "succeeded");
    let metrics = http::request(api, "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(text.contains("scheduler_results_total 1\n"), "{text}");
    assert!(
        text.contains("scheduler_duplicate_results_total 1\n"),
        "{text}"
    );

    // Reports are acknowledged as one batch.
    send_up(
        &mut agent,
        fleet::up::REPORT,
        &fleet::ReportBatch {
            reports: vec![
                fleet::Report {
                    message_id: "r-1".into(),
                    at_ms: 1,
                    metrics: BTreeMap::from([("cpu_pct".into(), 12.5)]),
                },
                fleet::Report {
                    message_id: "r-2".into(),
                    at_ms: 2,
                    metrics: BTreeMap::from([("cpu_pct".into(), 13.5)]),
                },
            ],
        },
    )
    .await;
    let ack: fleet::Ack = next_push(&mut agent, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec!["r-1".to_owned(), "r-2".to_owned()]);

    // Disconnect: offline at once (the gateway's disconnect event), announced.
    agent.close().await;
    eventually(api, "/v1/agents/node-1", |v| v["state"] == "offline").await;
    let offline = loop {
        let msg = tokio::time::timeout(WAIT, states.next())
            .await
            .unwrap()
            .unwrap();
        let change: fleet::StateChange = payload::from_bus(&msg.payload).unwrap();
        if change.to == AgentState::Offline {
            break change;
        }
    };
    assert_eq!(offline.from, Some(AgentState::Online));

    // A task created meanwhile (by label) waits, then is delivered after the agent comes
    // back and registers.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({
            "targets": {"labels": {"region": "eu"}},
            "spec": {"kind": "tcp_probe", "target": "127.0.0.1:9"},
            "timeout_ms": 2000
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    assert_eq!(r.json()["dispatched"], 0);
    let queued = r.json()["task_id"].as_u64().unwrap();
    let qpath = format!("/v1/tasks/{queued}");
    let v = http::get(api, &qpath, KEY).await.unwrap().json();
    assert_eq!(v["targets"]["node-1"]["state"], "pending");

    let mut agent = connect_agent(gw.addr()).await;
    send_up(
        &mut agent,
        fleet::up::REGISTER,
        &register(&[("region", "eu")]),
    )
    .await;
    let task: fleet::Task = next_push(&mut agent, fleet::down::TASK).await;
    assert_eq!((task.task_id, task.attempt), (queued, 1));
    assert_eq!(
        task.spec,
        fleet::TaskKind::TcpProbe {
            target: "127.0.0.1:9".into()
        }
    );
    eventually(api, &qpath, |v| {
        v["targets"]["node-1"]["state"] == "dispatched"
    })
    .await;
    eventually(api, "/v1/agents/node-1", |v| v["state"] == "online").await;

    // Cancel reaches the agent holding it.
    let r = http::post_json(api, &format!("{qpath}/cancel"), KEY, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json());
    let cancel: fleet::Cancel = next_push(&mut agent, fleet::down::CANCEL).await;
    assert_eq!(cancel.task_id, queued);
    let v = http::get(api, &qpath, KEY).await.unwrap().json();
    assert_eq!(v["targets"]["node-1"]["state"], "cancelled");

    let list = http::get(api, "/v1/tasks", KEY).await.unwrap().json();
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(2));

    // Restart with a short heartbeat period: the new instance asks the gateways to
    // re-announce their sessions, so the connected agent's presence batches are attributed
    // and it stays online well past three periods without registering again.
    sched.shutdown().await.unwrap();
    let mut config = scheduler_config(&url, dir.path());
    config.heartbeat = Duration::from_millis(400);
    let sched = start_scheduler(config).await;
    let api = sched.addr();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let v = http::get(api, "/v1/agents/node-1", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["state"], "online", "{v}");
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({
            "targets": {"nodes": ["node-1"]},
            "spec": {"kind": "http_probe", "url": "http://127.0.0.1:9/"}
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["dispatched"], 1, "{:?}", r.json());
    let task: fleet::Task = next_push(&mut agent, fleet::down::TASK).await;
    assert_eq!(task.task_id, r.json()["task_id"].as_u64().unwrap());

    agent.close().await;
    sched.shutdown().await.unwrap();
    let _ = gw.shutdown().await;
}

#[tokio::test]
async fn bad_api_input_is_a_4xx_with_a_json_error_and_changes_nothing() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(&url, dir.path()).await;
    let api = sched.addr();

    let r = http::get(api, "/v1/agents", "wrong-key-0123456789")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (401, json!("unauthorized"))
    );
    let cases = [
        (
            json!({"targets": {"nodes": ["ghost"]}, "spec": {"kind": "command", "argv": ["x"]}}),
            "unknown_agent",
        ),
        (
            json!({"targets": {"labels": {"a": "b"}}, "spec": {"kind": "command", "argv": ["x"]}}),
            "no_targets",
        ),
        (
            json!({"targets": {"nodes": ["bad id!"]}, "spec": {"kind": "command", "argv": ["x"]}}),
            "malformed_id",
        ),
        (
            json!({"targets": {"nodes": ["n"]}, "spec": {"kind": "teleport"}}),
            "malformed_json",
        ),
        (
            json!({"targets": {"nodes": ["n"]}, "spec": {"kind": "command", "argv": ["x"]}, "timeout_ms": 0}),
            "invalid_task",
        ),
    ];
    for (body, error) in cases {
        let r = http::post_json(api, "/v1/tasks", KEY, &body).await.unwrap();
        assert!((400..500).contains(&r.status), "{body}: {}", r.status);
        assert_eq!(r.json()["error"], error, "{body}: {:?}", r.json());
    }
    let r = http::get(api, "/v1/agents?state=sleepy", KEY)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_state"))
    );
    let r = http::get(api, "/v1/tasks/77", KEY).await.unwrap();
    assert_eq!(r.status, 404);
    let r = http::get(api, "/v1/tasks/x", KEY).await.unwrap();
    assert_eq!(r.status, 400);
    let list = http::get(api, "/v1/tasks", KEY).await.unwrap().json();
    assert_eq!(list["tasks"], json!([]));
    sched.shutdown().await.unwrap();
}

#[tokio::test]
async fn liveness_follows_heartbeat_batches_and_overdue_attempts_retry_then_time_out() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let mut config = scheduler_config(&url, dir.path());
    config.heartbeat = Duration::from_millis(200);
    config.sweep = Duration::from_millis(50);
    config.dispatch_timeout = Duration::from_millis(100);
    let sched = start_scheduler(config).await;
    let api = sched.addr();
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    let mut pushes = agent_pushes(&bus, "node-2").await;
    bus.flush().await.unwrap();

    // The gateway announces the socket, the agent registers.
    let gw = GatewayId::new("gw-x").unwrap();
    let connect = SessionEvent {
        socket_id: SocketId(42),
        user_id: UserId::new("node-2").unwrap(),
        kind: ClientKind::Agent,
        gateway: gw.clone(),
        at_ms: 1,
        allowed_rooms: vec![],
        close_code: None,
        reason: None,
        via: None,
        rooms: vec![],
        connected_at_ms: None,
    };
    bus.publish(
        subject::event(ClientKind::Agent, Event::Connect),
        payload::to_bus(&connect).unwrap().into(),
    )
    .await
    .unwrap();
    gateway_publish(&bus, "node-2", 42, fleet::up::REGISTER, &register(&[])).await;
    eventually(api, "/v1/agents/node-2", |v| v["state"] == "online").await;

    // Heartbeat batches naming its socket keep it online well past three periods.
    for _ in 0..16 {
        let batch = HeartbeatBatch {
            gateway: gw.clone(),
            at_ms: servicekit::clock::now_ms(),
            seen: vec![(SocketId(42), servicekit::clock::now_ms())],
        };
        bus.publish(
            subject::event(ClientKind::Agent, Event::Heartbeat),
            payload::to_bus(&batch).unwrap().into(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let v = http::get(api, "/v1/agents/node-2", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["state"], "online");
    // Silence: offline after three missed periods.
    eventually(api, "/v1/agents/node-2", |v| v["state"] == "offline").await;
    // A batch brings it back.
    let batch = HeartbeatBatch {
        gateway: gw.clone(),
        at_ms: servicekit::clock::now_ms(),
        seen: vec![(SocketId(42), servicekit::clock::now_ms())],
    };
    bus.publish(
        subject::event(ClientKind::Agent, Event::Heartbeat),
        payload::to_bus(&batch).unwrap().into(),
    )
    .await
    .unwrap();
    eventually(api, "/v1/agents/node-2", |v| v["state"] == "online").await;

    // An attempt that never reports is retried once, then times out.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({
            "targets": {"nodes": ["node-2"]},
            "spec": {"kind": "http_probe", "url": "http://127.0.0.1:9/"},
            "timeout_ms": 100,
            "max_attempts": 2
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["task_id"].as_u64().unwrap();
    let first: fleet::Task = bus_push(&mut pushes, fleet::down::TASK).await;
    assert_eq!((first.task_id, first.attempt), (id, 1));
    let second: fleet::Task = bus_push(&mut pushes, fleet::down::TASK).await;
    assert_eq!((second.task_id, second.attempt), (id, 2));
    let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["node-2"]["state"] == "timed_out"
    })
    .await;
    assert_eq!(v["targets"]["node-2"]["attempts"], 2);

    // Status degraded, and heartbeats keep it degraded.
    gateway_publish(
        &bus,
        "node-2",
        42,
        fleet::up::STATUS,
        &fleet::Status {
            state: AgentState::Degraded,
            reason: Some("disk 97%".into()),
        },
    )
    .await;
    eventually(api, "/v1/agents/node-2", |v| v["state"] == "degraded").await;
    let batch = HeartbeatBatch {
        gateway: gw.clone(),
        at_ms: servicekit::clock::now_ms(),
        seen: vec![(SocketId(42), servicekit::clock::now_ms())],
    };
    bus.publish(
        subject::event(ClientKind::Agent, Event::Heartbeat),
        payload::to_bus(&batch).unwrap().into(),
    )
    .await
    .unwrap();
    bus.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = http::get(api, "/v1/agents?state=degraded", KEY)
        .await
        .unwrap();
    assert_eq!(r.json()["agents"].as_array().map(Vec::len), Some(1));
    sched.shutdown().await.unwrap();

    // Restart on the same file: registry and tasks are intact.
    let sched = start_scheduler(scheduler_config(&url, dir.path())).await;
    let v = http::get(sched.addr(), &format!("/v1/tasks/{id}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["targets"]["node-2"]["state"], "timed_out");
    let v = http::get(sched.addr(), "/v1/agents/node-2", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["hostname"], "edge-1");
    sched.shutdown().await.unwrap();
}

fn refusal(message_id: &str, reason: &str, task_id: u64) -> fleet::Refused {
    fleet::Refused {
        message_id: message_id.into(),
        route: fleet::down::TASK.into(),
        reason: reason.into(),
        detail: format!("{reason} (test)"),
        command_id: Some("00".repeat(16)),
        task_id: Some(task_id),
        attempt: Some(1),
        at_ms: servicekit::clock::now_ms(),
    }
}

#[tokio::test]
async fn refusals_are_stored_acked_and_fail_only_genuine_commands() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(&url, dir.path()).await;
    let api = sched.addr();
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    let mut pushes = agent_pushes(&bus, "node-3").await;
    bus.flush().await.unwrap();
    gateway_publish(&bus, "node-3", 43, fleet::up::REGISTER, &register(&[])).await;
    eventually(api, "/v1/agents/node-3", |v| v["state"] == "online").await;
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"nodes": ["node-3"]}, "spec": {"kind": "command", "argv": ["echo"]}}),
    )
    .await
    .unwrap();
    let id = r.json()["task_id"].as_u64().unwrap();
    let task: fleet::Task = bus_push(&mut pushes, fleet::down::TASK).await;
    assert_eq!(task.task_id, id);

    // A forgery the agent refused names our task: stored and acked, the task untouched.
    let id_a = format!("{:032x}-1", 7u128);
    gateway_publish(
        &bus,
        "node-3",
        43,
        fleet::up::REFUSED,
        &refusal(&id_a, "bad_signature", id),
    )
    .await;
    let ack: fleet::Ack = bus_push(&mut pushes, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec![id_a]);
    let v = http::get(api, &format!("/v1/tasks/{id}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["targets"]["node-3"]["state"], "dispatched", "{v}");

    // Our own command arriving expired (clock skew): that attempt fails at once.
    let id_b = format!("{:032x}-2", 7u128);
    gateway_publish(
        &bus,
        "node-3",
        43,
        fleet::up::REFUSED,
        &refusal(&id_b, "expired", id),
    )
    .await;
    let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["node-3"]["state"] == "failed"
    })
    .await;
    assert!(v.to_string().contains("refused by the agent"), "{v}");
    // The refusal is stored beside the attempt's failure, not before it: wait for both.
    let refusals = eventually(api, "/v1/agents/node-3/refusals", |r| {
        r["refusals"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    assert_eq!(
        refusals["refusals"].as_array().unwrap().len(),
        2,
        "{refusals}"
    );
    let metrics = http::get(api, "/metrics", KEY).await.unwrap();
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("scheduler_commands_refused_total 2"),
        "metrics"
    );
    sched.shutdown().await.unwrap();
}
