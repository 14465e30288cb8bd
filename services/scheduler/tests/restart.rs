//! Restart safety and single-active leadership, against a real nats-server, real redb files
//! in temp dirs, and the real `scheduler` binary where a process has to die with SIGKILL.
//! The fake agent speaks over the bus subjects a gateway would use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use messages::fleet;
use serde_json::json;
use testkit::NatsServer;
use testkit::fleetbus::{
    agent_pushes, next_push as bus_push, publish_upstream as gateway_publish, register,
};
use testkit::http;

const KEY: &str = "test-api-key-0123456789";
const TTL: Duration = Duration::from_secs(2);
/// Upper bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(15);

/// A scheduler process, killed with SIGKILL when dropped so a failing test leaves none.
struct Process {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Process {
    fn start(nats: &str, db: &Path, instance: &str, dispatch_timeout_ms: u64) -> Self {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = db.with_extension(format!("{instance}.log"));
        let key_file = db.with_extension("command.key");
        std::fs::write(&key_file, testkit::ws::TEST_COMMAND_KEY).unwrap();
        let child = Command::new(testkit::process::binary("scheduler", "scheduler"))
            .env("SCHEDULER_LISTEN", addr.to_string())
            .env("SCHEDULER_NATS_URL", nats)
            .env("SCHEDULER_API_KEYS", KEY)
            .env("SCHEDULER_DB", db)
            .env("SCHEDULER_COMMAND_KEY_FILE", &key_file)
            .env("SCHEDULER_INSTANCE", instance)
            .env("SCHEDULER_LEASE_TTL_MS", TTL.as_millis().to_string())
            .env(
                "SCHEDULER_DISPATCH_TIMEOUT_MS",
                dispatch_timeout_ms.to_string(),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process { child, addr, log }
    }

    /// SIGKILL: no graceful stop, no lease release, the redb file left as it was.
    fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(nats: &str, db: &Path, instance: &str) -> scheduler::Config {
    let mut config = scheduler::Config::new(nats, vec![KEY.to_owned()], db);
    config.command_key = std::sync::Arc::new(
        messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap(),
    );
    config.instance = instance.to_owned();
    config.lease_ttl = TTL;
    config.sweep = Duration::from_millis(100);
    config
}

async fn status(addr: SocketAddr, path: &str) -> Option<(u16, serde_json::Value)> {
    let r = http::request(addr, "GET", path, &[], b"").await.ok()?;
    let body = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    Some((r.status, body))
}

/// Polls `path` until it answers `want`; returns the body.
async fn wait_status(addr: SocketAddr, path: &str, want: u16) -> serde_json::Value {
    http::wait_status(addr, path, want).await.json()
}

/// Polls until `check` accepts the JSON at `path`.
async fn eventually(
    addr: SocketAddr,
    path: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    http::eventually(addr, path, KEY, check).await
}

fn result(message_id: &str, task_id: u64, stdout: &str) -> fleet::TaskResult {
    fleet::TaskResult {
        message_id: message_id.into(),
        task_id,
        attempt: 1,
        outcome: fleet::Outcome::Succeeded,
        exit_code: Some(0),
        stdout_tail: stdout.into(),
        stderr_tail: String::new(),
        error: None,
        latency_ms: Some(4),
        http_status: None,
        finished_at_ms: 1_800_000_000_000,
        output_chunks: 0,
    }
}

async fn create_task(api: SocketAddr, node: &str, timeout_ms: u64) -> u64 {
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({
            "targets": {"nodes": [node]},
            "spec": {"kind": "command", "argv": ["uptime"]},
            "timeout_ms": timeout_ms,
            "max_attempts": 1
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    r.json()["task_id"].as_u64().unwrap()
}

#[tokio::test]
async fn a_standby_waits_and_takes_over_on_expiry_and_on_release() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.redb");

    // A: a real process, so it can die without releasing anything.
    let mut a = Process::start(&url, &db, "sched-a", 30_000);
    let ready = wait_status(a.addr, "/readyz", 200).await;
    assert_eq!(
        (ready["role"].as_str(), ready["instance"].as_str()),
        (Some("active"), Some("sched-a")),
        "{}",
        a.log()
    );

    // B on the same file stands by: it answers health checks, but is not ready and serves
    // no API (and has not opened the redb file, or A could not have kept it).
    let b = scheduler::spawn(
        config(&url, &db, "sched-b"),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let body = wait_status(b.addr(), "/readyz", 503).await;
    assert_eq!(
        body,
        json!({"ready": false, "role": "standby", "instance": "sched-b"})
    );
    assert_eq!(status(b.addr(), "/healthz").await.unwrap().0, 200);
    let r = http::get(b.addr(), "/v1/agents", KEY).await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "standby");

    // A stores an agent.
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    register(&bus, "node-7", 71).await;
    eventually(a.addr, "/v1/agents/node-7", |v| v["state"] == "online").await;

    // A keeps refreshing: well past one TTL, B is still standing by.
    tokio::time::sleep(TTL + TTL / 2).await;
    assert_eq!(status(b.addr(), "/readyz").await.unwrap().0, 503);
    assert_eq!(status(a.addr, "/readyz").await.unwrap().0, 200);

    // A dies without releasing: B takes over once the lease expires (one TTL at most after
    // A's last refresh), and serves what A stored.
    a.kill_9();
    let killed = Instant::now();
    let ready = wait_status(b.addr(), "/readyz", 200).await;
    let took = killed.elapsed();
    assert_eq!(ready["role"], "active");
    assert!(
        took <= TTL + Duration::from_secs(2),
        "takeover took {took:?}"
    );
    let v = http::get(b.addr(), "/v1/agents/node-7", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["hostname"], "edge-1");

    // A graceful stop releases the lease after closing the store: C, standing by, takes
    // over well within a TTL.
    let c = scheduler::spawn(
        config(&url, &db, "sched-c"),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let body = wait_status(c.addr(), "/readyz", 503).await;
    assert_eq!(body["role"], "standby");
    b.shutdown().await.unwrap();
    let stopped = Instant::now();
    wait_status(c.addr(), "/readyz", 200).await;
    let took = stopped.elapsed();
    assert!(took < TTL, "takeover after a release took {took:?}");
    let v = http::get(c.addr(), "/v1/agents/node-7", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["hostname"], "edge-1");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn kill_9_mid_task_then_restart_keeps_registry_tasks_and_results() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.redb");
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    let mut pushes = agent_pushes(&bus, "node-8").await;
    bus.flush().await.unwrap();

    // Slack of 3 s on top of each task's own timeout before an attempt expires.
    let mut first = Process::start(&url, &db, "sched-1", 3_000);
    wait_status(first.addr, "/readyz", 200).await;
    let api = first.addr;
    register(&bus, "node-8", 81).await;
    eventually(api, "/v1/agents/node-8", |v| v["state"] == "online").await;

    // Done before the crash: dispatched, result stored and acknowledged.
    let done = create_task(api, "node-8", 60_000).await;
    let task: fleet::Task = bus_push(&mut pushes, fleet::down::TASK).await;
    assert_eq!((task.task_id, task.attempt), (done, 1));
    gateway_publish(
        &bus,
        "node-8",
        81,
        fleet::up::RESULT,
        &result("m-1", done, "one"),
    )
    .await;
    let ack: fleet::Ack = bus_push(&mut pushes, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec!["m-1".to_owned()]);

    // In flight at the crash: one the agent will finish, one it never reports on.
    let finishes = create_task(api, "node-8", 60_000).await;
    let task: fleet::Task = bus_push(&mut pushes, fleet::down::TASK).await;
    assert_eq!(task.task_id, finishes);
    gateway_publish(
        &bus,
        "node-8",
        81,
        fleet::up::STARTED,
        &fleet::TaskStarted {
            task_id: finishes,
            attempt: 1,
            at_ms: 1_800_000_000_000,
        },
    )
    .await;
    let silent = create_task(api, "node-8", 500).await;
    let task: fleet::Task = bus_push(&mut pushes, fleet::down::TASK).await;
    assert_eq!(task.task_id, silent);
    eventually(api, &format!("/v1/tasks/{finishes}"), |v| {
        v["targets"]["node-8"]["state"] == "running"
    })
    .await;
    eventually(api, &format!("/v1/tasks/{silent}"), |v| {
        v["targets"]["node-8"]["state"] == "dispatched"
    })
    .await;

    // SIGKILL mid-task, then the same binary again on the same file. It waits for its old
    // lease to expire (a lease holding our own name is not reclaimed), then takes over.
    first.kill_9();
    let second = Process::start(&url, &db, "sched-1", 3_000);
    wait_status(second.addr, "/readyz", 200).await;
    let api = second.addr;

    // Registry, tasks and the stored result are intact.
    let v = http::get(api, "/v1/agents/node-8", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(
        (&v["hostname"], &v["labels"]),
        (&json!("edge-1"), &json!({"region": "eu"})),
        "{}",
        second.log()
    );
    let v = http::get(api, &format!("/v1/tasks/{done}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["targets"]["node-8"]["state"], "succeeded");
    assert_eq!(v["results"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["results"][0]["body"]["stdout_tail"], "one");
    let v = http::get(api, &format!("/v1/tasks/{finishes}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["targets"]["node-8"]["state"], "running");

    // The in-flight attempt continues: its result after the restart is stored and
    // acknowledged.
    gateway_publish(
        &bus,
        "node-8",
        81,
        fleet::up::RESULT,
        &result("m-2", finishes, "two"),
    )
    .await;
    let ack: fleet::Ack = bus_push(&mut pushes, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec!["m-2".to_owned()]);
    let v = eventually(api, &format!("/v1/tasks/{finishes}"), |v| {
        v["targets"]["node-8"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(v["results"][0]["body"]["stdout_tail"], "two");

    // A replay of the result stored before the crash is acknowledged, not counted again.
    gateway_publish(
        &bus,
        "node-8",
        81,
        fleet::up::RESULT,
        &result("m-1", done, "one"),
    )
    .await;
    let ack: fleet::Ack = bus_push(&mut pushes, fleet::down::ACK).await;
    assert_eq!(ack.message_ids, vec!["m-1".to_owned()]);
    let v = http::get(api, &format!("/v1/tasks/{done}"), KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(v["results"].as_array().map(Vec::len), Some(1));

    // The silent attempt times out as its policy says (one attempt, 0.5 s + 3 s slack).
    let v = eventually(api, &format!("/v1/tasks/{silent}"), |v| {
        v["targets"]["node-8"]["state"] == "timed_out"
    })
    .await;
    assert_eq!(v["targets"]["node-8"]["attempts"], 1);
}

#[tokio::test]
async fn an_active_instance_that_loses_its_lease_stops_with_an_error() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let a = scheduler::spawn(
        config(&url, &dir.path().join("s.redb"), "sched-a"),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let addr = a.addr();
    wait_status(addr, "/readyz", 200).await;

    // Someone else takes the key (as if A's refreshes had stalled past the TTL and another
    // instance had taken over): A's next compare-and-set refresh fails.
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let kv = js
        .get_key_value(scheduler::lease::DEFAULT_BUCKET)
        .await
        .unwrap();
    kv.delete(scheduler::lease::KEY).await.unwrap();
    kv.create(scheduler::lease::KEY, "intruder".into())
        .await
        .unwrap();

    // A stops serving (within one refresh period) and reports why.
    let give_up = Instant::now() + WAIT;
    while status(addr, "/healthz").await.is_some() {
        assert!(Instant::now() < give_up, "A kept serving without its lease");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(matches!(
        a.shutdown().await,
        Err(scheduler::Error::LeaseLost)
    ));
    // It did not touch the lease it lost.
    let entry = kv.entry(scheduler::lease::KEY).await.unwrap().unwrap();
    assert_eq!(entry.value.as_ref(), b"intruder");
}

/// The `schedule.fire` audit entries as (period, task id), in log order.
async fn fires(api: SocketAddr) -> Vec<(u64, Option<u64>)> {
    let v = http::get(api, "/v1/audit?limit=1000", KEY)
        .await
        .unwrap()
        .json();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "schedule.fire")
        .map(|e| {
            (
                e["detail"]["period"].as_u64().unwrap(),
                e["detail"]["task_id"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_schedule_fires_each_period_once_across_a_kill_9_failover() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.redb");
    let mut a = Process::start(&url, &db, "sched-a", 30_000);
    wait_status(a.addr, "/readyz", 200).await;
    let b = scheduler::spawn(
        config(&url, &db, "sched-b"),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    wait_status(b.addr(), "/readyz", 503).await;

    let bus = async_nats::connect(url.as_str()).await.unwrap();
    register(&bus, "node-7", 71).await;
    eventually(a.addr, "/v1/agents/node-7", |v| v["state"] == "online").await;

    // Every second, overlap allowed (the fake agent never answers, so every run stays
    // unfinished; `skip` would fire only once).
    let r = http::post_json(
        a.addr,
        "/v1/schedules",
        KEY,
        &json!({
            "cron": "* * * * * *",
            "overlap": "allow",
            "targets": {"nodes": ["node-7"]},
            "spec": {"kind": "command", "argv": ["uptime"]},
            "timeout_ms": 60000
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["schedule_id"].as_u64().unwrap();
    let path = format!("/v1/schedules/{id}");
    let v = eventually(a.addr, &path, |v| v["fired"].as_u64() >= Some(2)).await;

    // Kill A right after a fire: as soon as it reports a new last fire.
    let seen = v["last_fire_secs"].as_u64();
    let deadline = Instant::now() + WAIT;
    let last_a = loop {
        let v = http::get(a.addr, &path, KEY).await.unwrap().json();
        if v["last_fire_secs"].as_u64() != seen {
            a.kill_9();
            break v["last_fire_secs"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "no fire in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    eprintln!("killed A after period {last_a}");
    // B takes over and keeps firing.
    wait_status(b.addr(), "/readyz", 200).await;
    let v = eventually(b.addr(), &path, |v| {
        v["last_fire_secs"]
            .as_u64()
            .is_some_and(|l| l >= last_a + 3)
    })
    .await;
    b.shutdown().await.unwrap();

    // Reopen the file (B released it) and count: one fire entry and one task per period,
    // the period A fired just before dying among them once.
    let c = scheduler::spawn(
        config(&url, &db, "sched-c"),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    wait_status(c.addr(), "/readyz", 200).await;
    let fired = fires(c.addr()).await;
    let mut periods: Vec<u64> = fired.iter().map(|(p, _)| *p).collect();
    let n = periods.len();
    periods.sort_unstable();
    periods.dedup();
    assert_eq!(periods.len(), n, "a period fired twice: {fired:?}");
    assert_eq!(
        fired.iter().filter(|(p, _)| *p == last_a).count(),
        1,
        "{fired:?}"
    );
    assert!(fired.iter().all(|(_, t)| t.is_some()), "{fired:?}");
    let tasks = http::get(c.addr(), "/v1/tasks?limit=1000", KEY)
        .await
        .unwrap()
        .json();
    let task_count = tasks["tasks"].as_array().unwrap().len();
    // C may have fired one more period since; count against its own view.
    let fired_now = fires(c.addr()).await.len();
    assert!(
        task_count == n || task_count == fired_now,
        "{task_count} tasks for {n} fires: {fired:?}"
    );
    assert!(v["fired"].as_u64().unwrap() as usize <= n);
    // Periods strictly increase in log order: a takeover never goes back in time.
    assert!(fired.windows(2).all(|w| w[0].0 < w[1].0), "{fired:?}");
    c.shutdown().await.unwrap();
}

/// The `rollout.step` audit entries: (step, task id).
async fn rollout_steps(api: SocketAddr) -> Vec<(String, u64)> {
    let v = http::get(api, "/v1/audit?limit=1000", KEY)
        .await
        .unwrap()
        .json();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rollout.step")
        .map(|e| {
            (
                e["detail"]["step"].as_str().unwrap_or_default().to_owned(),
                e["detail"]["task_id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_rollout_neither_repeats_nor_skips_a_batch_across_a_kill_9_failover() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.redb");
    let mut a = Process::start(&url, &db, "sched-a", 30_000);
    wait_status(a.addr, "/readyz", 200).await;
    let b = scheduler::spawn(
        config(&url, &db, "sched-b"),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    wait_status(b.addr(), "/readyz", 503).await;

    let bus = async_nats::connect(url.as_str()).await.unwrap();
    let nodes: Vec<String> = (0..8).map(|i| format!("roll-{i}")).collect();
    for (i, n) in nodes.iter().enumerate() {
        register(&bus, n, 700 + i as u64).await;
    }
    for n in &nodes {
        eventually(a.addr, &format!("/v1/agents/{n}"), |v| {
            v["state"] == "online"
        })
        .await;
    }
    // Batches of one that close at their 400 ms deadline (the fake agents never answer);
    // 100% tolerated, so it runs to the end: 8 batches, about 3 s.
    let r = http::post_json(
        a.addr,
        "/v1/rollouts",
        KEY,
        &json!({
            "targets": {"labels": {"region": "eu"}},
            "spec": {"kind": "command", "argv": ["uptime"]},
            "stages": [{"name": "full", "size": "100%"}],
            "batch": 1,
            "batch_timeout_ms": 400,
            "max_failure_percent": 100
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["rollout_id"].as_u64().unwrap();
    let path = format!("/v1/rollouts/{id}");
    // Kill A just after it started its third batch.
    let deadline = Instant::now() + WAIT;
    loop {
        let v = http::get(a.addr, &path, KEY).await.unwrap().json();
        if v["batches_started"].as_u64() >= Some(3) {
            a.kill_9();
            break;
        }
        assert!(Instant::now() < deadline, "no third batch in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // B takes over and finishes it.
    wait_status(b.addr(), "/readyz", 200).await;
    let v = eventually(b.addr(), &path, |v| v["state"] == "completed").await;
    assert_eq!(v["batches_started"], 8, "{v}");
    assert_eq!(v["history"].as_array().unwrap().len(), 8, "{v}");
    let steps = rollout_steps(b.addr()).await;
    let started: Vec<u64> = steps
        .iter()
        .filter(|(s, _)| s == "batch_started")
        .map(|(_, t)| *t)
        .collect();
    let finished: Vec<u64> = steps
        .iter()
        .filter(|(s, _)| s == "batch_finished")
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(started.len(), 8, "{steps:?}");
    assert_eq!(finished, started, "each batch finished once, in order");
    // Every target in exactly one batch task.
    let mut targeted = Vec::new();
    for task in &started {
        let t = http::get(b.addr(), &format!("/v1/tasks/{task}"), KEY)
            .await
            .unwrap()
            .json();
        let targets = t["targets"].as_object().unwrap();
        assert_eq!(targets.len(), 1, "{t}");
        targeted.extend(targets.keys().cloned());
    }
    targeted.sort();
    assert_eq!(targeted, nodes, "each node once");
    b.shutdown().await.unwrap();
}
