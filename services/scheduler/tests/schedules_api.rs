//! `/v1/schedules` over the real HTTP API of a real scheduler (in-process) on a real
//! nats-server and redb file: bad input is refused with a JSON error and stores nothing,
//! scopes are those of the task API, every change is audited with the key's name, pause
//! and resume, and `schedctl schedule ...`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use scheduler::auth::ApiKey;
use serde_json::{Value, json};
use testkit::NatsServer;
use testkit::http::{self, Response};

const OPS: &str = "ops-secret-0123456789abcdef";
const DASH: &str = "dash-secret-0123456789abcdef";

fn config(nats: &str, db: &Path) -> scheduler::Config {
    let mut config = scheduler::Config::new(nats, vec![], db);
    config.api_keys = vec![ApiKey::operator("ops", OPS), ApiKey::read("dash", DASH)];
    config.lease_ttl = Duration::from_secs(2);
    config.sweep = Duration::from_millis(100);
    config
}

async fn call(addr: SocketAddr, method: &str, path: &str, key: &str, body: &[u8]) -> Response {
    let auth = format!("Bearer {key}");
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    http::request(addr, method, path, &headers, body)
        .await
        .unwrap()
}

async fn post(addr: SocketAddr, path: &str, key: &str, body: &Value) -> Response {
    call(addr, "POST", path, key, &serde_json::to_vec(body).unwrap()).await
}

fn schedule(cron: &str) -> Value {
    json!({
        "cron": cron,
        "targets": {"labels": {"region": "eu"}},
        "spec": {"kind": "command", "argv": ["uptime"]},
    })
}

async fn list(addr: SocketAddr) -> Vec<Value> {
    let r = http::get(addr, "/v1/schedules", DASH).await.unwrap();
    assert_eq!(r.status, 200);
    r.json()["schedules"].as_array().unwrap().clone()
}

async fn audit_actions(addr: SocketAddr) -> Vec<(String, String)> {
    let r = http::get(addr, "/v1/audit?limit=1000", DASH).await.unwrap();
    r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_owned(),
                e["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler::spawn(
        config(&nats.url(), &dir.path().join("s.redb")),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let api = sched.addr();
    http::wait_status(api, "/readyz", 200).await;

    for (body, error) in [
        (schedule("61 * * * *"), "invalid_cron"),
        (schedule("not a cron"), "invalid_cron"),
        (schedule("* * *"), "invalid_cron"),
        (schedule("@hourly"), "invalid_cron"),
        (schedule(""), "invalid_cron"),
        (
            json!({"cron": "* * * * *", "overlap": "queue", "targets": {"nodes": ["n1"]}, "spec": {"kind": "command", "argv": ["x"]}}),
            "bad_overlap",
        ),
        (
            json!({"cron": "* * * * *", "targets": {"labels": {}}, "spec": {"kind": "command", "argv": ["x"]}}),
            "invalid_task",
        ),
        (
            json!({"cron": "* * * * *", "targets": {"nodes": ["n1"]}, "spec": {"kind": "command", "argv": []}}),
            "invalid_task",
        ),
        (
            json!({"cron": "* * * * *", "targets": {"nodes": ["bad id!"]}, "spec": {"kind": "command", "argv": ["x"]}}),
            "malformed_id",
        ),
        (
            json!({"cron": "* * * * *", "spec": {"kind": "command", "argv": ["x"]}}),
            "malformed_json",
        ),
        (
            json!({"cron": "* * * * *", "every": 5, "targets": {"nodes": ["n1"]}, "spec": {"kind": "command", "argv": ["x"]}}),
            "malformed_json",
        ),
    ] {
        let r = post(api, "/v1/schedules", OPS, &body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.json());
        assert_eq!(r.json()["error"], error, "{body}: {:?}", r.json());
        assert!(r.json()["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let r = post(api, "/v1/schedules", OPS, &schedule("61 * * * *")).await;
    assert!(
        r.json()["detail"].as_str().unwrap().contains("61 * * * *"),
        "the detail names the expression: {:?}",
        r.json()
    );
    let r = call(api, "POST", "/v1/schedules", OPS, b"{not json").await;
    assert_eq!(r.status, 400);
    assert!(list(api).await.is_empty(), "nothing stored");
    assert!(
        !audit_actions(api)
            .await
            .iter()
            .any(|(_, a)| a == "schedule.create")
    );

    // Ids: malformed is 400, unknown is 404, for every verb.
    let r = http::get(api, "/v1/schedules/abc", DASH).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "malformed_id");
    let r = http::get(api, "/v1/schedules/99", DASH).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        call(api, "DELETE", "/v1/schedules/99", OPS, b"")
            .await
            .status,
        404
    );
    assert_eq!(
        post(api, "/v1/schedules/99/pause", OPS, &json!({}))
            .await
            .status,
        404
    );
    assert_eq!(
        post(api, "/v1/schedules/99/resume", OPS, &json!({}))
            .await
            .status,
        404
    );
    sched.shutdown().await.unwrap();
}

#[tokio::test]
async fn scopes_audit_pause_resume_and_schedctl() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler::spawn(
        config(&nats.url(), &dir.path().join("s.redb")),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let api = sched.addr();
    http::wait_status(api, "/readyz", 200).await;

    // A read-only key cannot create, pause or delete; no key at all is 401.
    let r = post(api, "/v1/schedules", DASH, &schedule("*/5 * * * *")).await;
    assert_eq!(r.status, 403, "{:?}", r.json());
    let r = http::request(api, "GET", "/v1/schedules", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(list(api).await.is_empty());

    let r = post(api, "/v1/schedules", OPS, &schedule("*/5 * * * *")).await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let created = r.json();
    let id = created["schedule_id"].as_u64().unwrap();
    assert_eq!(created["overlap"], "skip", "skip is the default");
    assert_eq!(created["timezone"], "UTC");
    assert_eq!(created["paused"], false);
    assert_eq!(created["created_by"], "ops");
    assert!(created["last_fire_at"].is_null() && created["last_task_id"].is_null());
    let next = created["next_fire_secs"].as_u64().unwrap();
    assert_eq!(next % 300, 0, "every 5 minutes on the minute: {created}");
    let now = servicekit::clock::now_secs();
    assert!(next > now && next <= now + 300, "{next} vs {now}");
    assert!(created["next_fire_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        created["task"]["targets"],
        json!({"labels": {"region": "eu"}})
    );

    // Read keys read.
    let r = http::get(api, &format!("/v1/schedules/{id}"), DASH)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["schedule_id"], id);
    assert_eq!(
        post(api, &format!("/v1/schedules/{id}/pause"), DASH, &json!({}))
            .await
            .status,
        403
    );
    assert_eq!(
        call(api, "DELETE", &format!("/v1/schedules/{id}"), DASH, b"")
            .await
            .status,
        403
    );

    // Pause: no next fire; resume: a next fire again.
    let r = post(api, &format!("/v1/schedules/{id}/pause"), OPS, &json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["paused"], true);
    assert!(r.json()["next_fire_secs"].is_null());
    let r = post(api, &format!("/v1/schedules/{id}/resume"), OPS, &json!({})).await;
    assert_eq!(r.json()["paused"], false);
    assert!(r.json()["next_fire_secs"].as_u64().is_some());

    // schedctl: create with --selector and --overlap allow, list, get, pause, delete.
    let (code, out, err) = schedctl(
        api,
        OPS,
        &[
            "schedule",
            "create",
            "--cron",
            "0 3 * * MON",
            "--selector",
            "region=eu",
            "--overlap",
            "allow",
            "--",
            "df",
            "-h",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 3 * * MON") && out.contains("allow"),
        "{out}"
    );
    assert!(out.contains("df -h"), "{out}");
    let (code, out, _) = schedctl(api, DASH, &["--json", "schedule", "list"]).await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let second = v["schedules"][1]["schedule_id"].as_u64().unwrap();
    assert_eq!(v["schedules"][1]["overlap"], "allow");
    // The next Monday, 03:00 UTC.
    let next = v["schedules"][1]["next_fire_at"].as_str().unwrap();
    assert!(next.ends_with("T03:00:00Z"), "{next}");
    let (code, out, _) = schedctl(api, DASH, &["schedule", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("NEXT FIRE") && out.contains("*/5 * * * *"),
        "{out}"
    );
    let (code, out, _) = schedctl(api, DASH, &["schedule", "get", &second.to_string()]).await;
    assert_eq!(code, 0);
    assert!(out.contains("0 3 * * MON"), "{out}");
    let (code, _, err) = schedctl(api, DASH, &["schedule", "pause", &second.to_string()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("403"), "{err}");
    let (code, out, _) = schedctl(api, OPS, &["schedule", "pause", &second.to_string()]).await;
    assert_eq!(code, 0);
    assert!(out.contains("paused"), "{out}");
    let (code, _, _) = schedctl(api, OPS, &["schedule", "resume", &second.to_string()]).await;
    assert_eq!(code, 0);
    let (code, _, err) = schedctl(
        api,
        OPS,
        &[
            "schedule",
            "create",
            "--cron",
            "99 * * * *",
            "--nodes",
            "a",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("400") && err.contains("invalid_cron"), "{err}");
    let (code, _, err) = schedctl(
        api,
        OPS,
        &["schedule", "create", "--cron", "* * * * *", "--", "true"],
    )
    .await;
    assert_eq!(code, 64, "no target is a usage error: {err}");
    let (code, out, _) = schedctl(api, OPS, &["schedule", "delete", &second.to_string()]).await;
    assert_eq!(code, 0);
    assert!(out.contains("deleted"), "{out}");

    let r = call(api, "DELETE", &format!("/v1/schedules/{id}"), OPS, b"").await;
    assert_eq!(r.status, 200);
    assert!(list(api).await.is_empty());

    let actions = audit_actions(api).await;
    let ours: Vec<&str> = actions
        .iter()
        .filter(|(_, a)| a.starts_with("schedule."))
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(
        ours,
        [
            "schedule.create",
            "schedule.pause",
            "schedule.resume",
            "schedule.create",
            "schedule.pause",
            "schedule.resume",
            "schedule.delete",
            "schedule.delete",
        ]
    );
    assert!(
        actions
            .iter()
            .filter(|(_, a)| a.starts_with("schedule."))
            .all(|(actor, _)| actor == "ops")
    );
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

/// The `schedule.fire` audit entries as (period, detail).
async fn fires(addr: SocketAddr) -> Vec<(u64, Value)> {
    let r = http::get(addr, "/v1/audit?limit=1000", DASH).await.unwrap();
    r.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "schedule.fire")
        .map(|e| (e["detail"]["period"].as_u64().unwrap(), e["detail"].clone()))
        .collect()
}

/// Downtime: the periods missed while no scheduler ran are not all fired on restart, only
/// the latest, once. The target node does not exist, so every period is a recorded
/// failure (`last_error`, audited with its period) rather than a task.
#[tokio::test]
async fn after_downtime_only_the_latest_missed_period_fires() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("s.redb");
    let sched = scheduler::spawn(
        config(&nats.url(), &db),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let api = sched.addr();
    http::wait_status(api, "/readyz", 200).await;
    let r = post(
        api,
        "/v1/schedules",
        OPS,
        &json!({
            "cron": "* * * * * *",
            "targets": {"nodes": ["ghost"]},
            "spec": {"kind": "command", "argv": ["true"]},
        }),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let path = format!("/v1/schedules/{}", r.json()["schedule_id"]);
    let v = http::eventually(api, &path, DASH, |v| v["last_error"].is_string()).await;
    assert!(v["last_error"].as_str().unwrap().contains("ghost"), "{v}");
    assert!(v["last_task_id"].is_null() && v["fired"] == 0, "{v}");
    sched.shutdown().await.unwrap();
    // Every period fired before the stop is at or before this second.
    let stopped = servicekit::clock::now_secs();

    // Down for 3.5 s: at least three periods missed.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let sched = scheduler::spawn(
        config(&nats.url(), &db),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let api = sched.addr();
    http::wait_status(api, "/readyz", 200).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let after = loop {
        let all = fires(api).await;
        if all.iter().filter(|(p, _)| *p > stopped).count() >= 2 {
            break all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no fires after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last_before = after
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| *p <= stopped)
        .max()
        .unwrap();
    let first_after = after
        .iter()
        .map(|(p, _)| *p)
        .find(|p| *p > stopped)
        .unwrap();
    assert!(
        first_after >= last_before + 3,
        "the catch-up is the latest missed period: {last_before} then {first_after}"
    );
    let periods: Vec<u64> = after.iter().map(|(p, _)| *p).collect();
    assert!(
        !periods.iter().any(|p| *p > last_before && *p < first_after),
        "no earlier missed period fired: {periods:?}"
    );
    assert!(periods.windows(2).all(|w| w[0] < w[1]), "{periods:?}");
    assert!(
        after.iter().all(|(_, d)| d["error"].is_string()),
        "{after:?}"
    );
    sched.shutdown().await.unwrap();
}
