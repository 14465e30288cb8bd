//! Operator safety over the real HTTP API of a real scheduler (its `run`, in-process) on a
//! real nats-server and redb file: named and scoped API keys, `Idempotency-Key` on task
//! creation (also across a restart), and the audit log. The agent is faked on the bus
//! subjects a gateway would use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use scheduler::auth::ApiKey;
use serde_json::{Value, json};
use testkit::NatsServer;
use testkit::fleetbus::register;
use testkit::http::{self, Response};

const OPS: &str = "ops-secret-0123456789abcdef";
const CI: &str = "ci-secret-0123456789abcdef";
const DASH: &str = "dash-secret-0123456789abcdef";

fn config(nats: &str, db: &Path) -> scheduler::Config {
    let mut config = scheduler::Config::new(nats, vec![], db);
    config.api_keys = vec![
        ApiKey::operator("ops", OPS),
        ApiKey::operator("ci", CI),
        ApiKey::read("dash", DASH),
    ];
    config.lease_ttl = Duration::from_secs(2);
    config.sweep = Duration::from_millis(100);
    config
}

async fn start(nats: &str, db: &Path) -> scheduler::Handle {
    let handle =
        scheduler::spawn(config(nats, db), TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(handle.addr(), "/readyz", 200).await;
    handle
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    headers.extend_from_slice(extra);
    http::request(addr, method, path, &headers, body)
        .await
        .unwrap()
}

async fn post(
    addr: SocketAddr,
    path: &str,
    key: &str,
    extra: &[(&str, &str)],
    body: &Value,
) -> Response {
    call(
        addr,
        "POST",
        path,
        Some(key),
        extra,
        &serde_json::to_vec(body).unwrap(),
    )
    .await
}

async fn get(addr: SocketAddr, path: &str, key: &str) -> Value {
    let r = http::get(addr, path, key).await.unwrap();
    assert_eq!(r.status, 200, "{path}: {:?}", r.json());
    r.json()
}

fn task(argv: &str) -> Value {
    json!({
        "targets": {"nodes": ["node-1"]},
        "spec": {"kind": "command", "argv": [argv]},
        "timeout_ms": 60000
    })
}

async fn task_count(addr: SocketAddr) -> usize {
    get(addr, "/v1/tasks?limit=1000", DASH).await["tasks"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test]
async fn an_idempotency_key_creates_one_task_even_across_a_restart() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.redb");
    let sched = start(&url, &db).await;
    let api = sched.addr();
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    register(&bus, "node-1", 11).await;
    http::eventually(api, "/v1/agents/node-1", DASH, |v| v["state"] == "online").await;

    let key = [("Idempotency-Key", "retry-7f3a")];
    let first = post(api, "/v1/tasks", OPS, &key, &task("uptime")).await;
    assert_eq!(first.status, 201, "{:?}", first.json());
    assert_eq!(first.json()["replayed"], false);
    let id = first.json()["task_id"].as_u64().unwrap();

    // The retry (same body, keys in another order and other white space): the same task,
    // 200, marked as a replay; no second task.
    let same = br#"{ "timeout_ms": 60000, "spec": {"argv": ["uptime"], "kind": "command"},
        "targets": {"nodes": ["node-1"]} }"#;
    let again = call(api, "POST", "/v1/tasks", Some(OPS), &key, same).await;
    assert_eq!(again.status, 200, "{:?}", again.json());
    assert_eq!(again.json(), json!({"task_id": id, "replayed": true}));
    assert_eq!(task_count(api).await, 1);

    // The same key with another body: 422 with a clear error, nothing created.
    let changed = post(api, "/v1/tasks", OPS, &key, &task("df")).await;
    assert_eq!(changed.status, 422, "{:?}", changed.json());
    assert_eq!(changed.json()["error"], "idempotency_key_reused");
    assert!(
        changed.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("retry-7f3a") && d.contains(&format!("task {id}"))),
        "{:?}",
        changed.json()
    );
    assert_eq!(task_count(api).await, 1);

    // Keys are per API key: another operator's request with the same key is its own.
    let ci = post(api, "/v1/tasks", CI, &key, &task("uptime")).await;
    assert_eq!(ci.status, 201, "{:?}", ci.json());
    let ci_id = ci.json()["task_id"].as_u64().unwrap();
    assert_ne!(ci_id, id);
    // A malformed key is refused before anything happens.
    let bad = post(
        api,
        "/v1/tasks",
        OPS,
        &[("Idempotency-Key", "")],
        &task("uptime"),
    )
    .await;
    assert_eq!(
        (bad.status, bad.json()["error"].clone()),
        (400, json!("bad_idempotency_key"))
    );
    assert_eq!(task_count(api).await, 2);

    // Restart on the same file: the key is still remembered.
    sched.shutdown().await.unwrap();
    let sched = start(&url, &db).await;
    let api = sched.addr();
    let after = call(api, "POST", "/v1/tasks", Some(OPS), &key, same).await;
    assert_eq!(after.status, 200, "{:?}", after.json());
    assert_eq!(after.json()["task_id"], id);
    let changed = post(api, "/v1/tasks", OPS, &key, &task("df")).await;
    assert_eq!(changed.status, 422, "{:?}", changed.json());
    assert_eq!(task_count(api).await, 2);
    // Exactly the two creates were audited.
    let log = get(api, "/v1/audit", DASH).await;
    let creates: Vec<(&str, &str)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    let (t1, t2) = (format!("task/{id}"), format!("task/{ci_id}"));
    assert_eq!(creates, [("ops", t1.as_str()), ("ci", t2.as_str())]);
    sched.shutdown().await.unwrap();
}

#[tokio::test]
async fn scopes_are_enforced_and_changes_are_audited_with_the_key_name() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let dir = tempfile::tempdir().unwrap();
    let sched = start(&url, &dir.path().join("s.redb")).await;
    let api = sched.addr();
    let bus = async_nats::connect(url.as_str()).await.unwrap();
    register(&bus, "node-1", 21).await;
    http::eventually(api, "/v1/agents/node-1", DASH, |v| v["state"] == "online").await;

    // Unknown or missing keys: 401 on reads and writes.
    for key in [Some("not-a-key-0123456789abcdef"), None] {
        for (method, path) in [
            ("GET", "/v1/agents"),
            ("POST", "/v1/tasks"),
            ("GET", "/v1/audit"),
        ] {
            let r = call(
                api,
                method,
                path,
                key,
                &[],
                &serde_json::to_vec(&task("uptime")).unwrap(),
            )
            .await;
            assert_eq!(r.status, 401, "{method} {path} with {key:?}");
            assert_eq!(r.json()["error"], "unauthorized");
        }
    }

    // The read key reads everything...
    for path in ["/v1/agents", "/v1/agents/node-1", "/v1/tasks", "/v1/audit"] {
        get(api, path, DASH).await;
    }
    // ...and changes nothing: 403 with a JSON error that says why.
    let refused = post(api, "/v1/tasks", DASH, &[], &task("uptime")).await;
    assert_eq!(refused.status, 403, "{:?}", refused.json());
    let body = refused.json();
    assert_eq!(body["error"], "forbidden");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("dash") && detail.contains("read") && detail.contains("operator"),
        "{detail}"
    );
    assert_eq!(task_count(api).await, 0);

    // The operator key creates (with a trace) and cancels.
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let created = post(
        api,
        "/v1/tasks",
        OPS,
        &[("traceparent", traceparent)],
        &task("uptime"),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.json());
    let id = created.json()["task_id"].as_u64().unwrap();
    let refused = post(
        api,
        &format!("/v1/tasks/{id}/cancel"),
        DASH,
        &[],
        &json!({}),
    )
    .await;
    assert_eq!(
        (refused.status, refused.json()["error"].clone()),
        (403, json!("forbidden"))
    );
    let cancelled = post(api, &format!("/v1/tasks/{id}/cancel"), OPS, &[], &json!({})).await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.json());

    // The log: the create and the cancel, by "ops", in order; the refusals are not there.
    let log = get(api, "/v1/audit", DASH).await;
    let entries = log["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{log}");
    let target = format!("task/{id}");
    let (create, cancel) = (&entries[0], &entries[1]);
    assert_eq!(
        (
            create["actor"].as_str(),
            create["action"].as_str(),
            create["target"].as_str()
        ),
        (Some("ops"), Some("task.create"), Some(target.as_str()))
    );
    assert_eq!(create["detail"]["request"], task("uptime"));
    assert_eq!(create["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(
        (
            cancel["actor"].as_str(),
            cancel["action"].as_str(),
            cancel["target"].as_str()
        ),
        (Some("ops"), Some("task.cancel"), Some(target.as_str()))
    );
    assert_eq!(cancel["detail"]["cancelled"], json!(["node-1"]));
    let (s1, s2) = (
        create["seq"].as_u64().unwrap(),
        cancel["seq"].as_u64().unwrap(),
    );
    assert!(s1 < s2);
    assert!(create["at_ms"].as_u64().unwrap() > 0);
    assert_eq!(log["next"], s2);

    // Paging: after the first entry only the second; after the last, nothing.
    let page = get(api, &format!("/v1/audit?since={s1}&limit=10"), OPS).await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(page["entries"][0]["seq"], s2);
    let page = get(api, &format!("/v1/audit?since={s2}"), DASH).await;
    assert_eq!(page, json!({"entries": [], "next": s2}));
    let bad = call(api, "GET", "/v1/audit?since=x", Some(DASH), &[], b"").await;
    assert_eq!(bad.status, 400);

    // schedctl with the read key: the log as a table; a cancel is refused with the reason.
    let (code, out, _) = schedctl(api, DASH, &["audit"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ops") && out.contains("task.create") && out.contains("task.cancel"),
        "{out}"
    );
    assert!(out.contains("command uptime"), "{out}");
    let (code, _, err) = schedctl(api, DASH, &["cancel", &id.to_string()]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("403") && err.contains("forbidden"), "{err}");
    let (code, out, _) = schedctl(api, OPS, &["--json", "audit", "--since", &s1.to_string()]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["entries"].as_array().map(Vec::len), Some(1), "{v}");
    sched.shutdown().await.unwrap();
}

/// Runs the real `schedctl`; returns its exit code, stdout and stderr.
async fn schedctl(api: SocketAddr, key: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_schedctl"));
    cmd.env("SCHEDULER_URL", format!("http://{api}"))
        .env("SCHEDULER_API_KEY", key)
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
