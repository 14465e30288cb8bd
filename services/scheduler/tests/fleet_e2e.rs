//! The fleet end to end: a real nats-server, a real gateway, the real scheduler and two real
//! agents (the agent library, over real WebSocket connections). Nothing is faked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::json;
use testkit::http;

mod common;
use common::{
    Fleet, KEY, READ_KEY, agent_config, agent_config_with, eventually, ready, scheduler_config,
};

#[tokio::test]
async fn tasks_to_a_label_selector_run_on_real_agents_and_results_are_stored_once() {
    let fleet = Fleet::start("gw-fleet").await;
    let (api, dir, gateway) = (fleet.sched.addr(), fleet.dir.path(), &fleet.gateway);

    // Agent configs resolve relative outbox paths against their file's directory.
    let mut eu = agent::start(agent_config(dir, "node-eu", "eu", gateway.addr()))
        .await
        .unwrap();
    let mut us = agent::start(agent_config(dir, "node-us", "us", gateway.addr()))
        .await
        .unwrap();
    for node in ["node-eu", "node-us"] {
        eventually(api, &format!("/v1/agents/{node}"), |v| {
            v["state"] == "online"
        })
        .await;
    }

    // A command to the eu selector runs on node-eu only.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"labels": {"region": "eu"}}, "spec": {"kind": "command", "argv": ["echo", "hello fleet"]}, "timeout_ms": 10000}),
    )
    .await
    .unwrap();
    assert!(
        r.status == 200 || r.status == 201 || r.status == 202,
        "{:?}",
        r.json()
    );
    let id = r.json()["task_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| r.json()["task_id"].to_string());
    let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["node-eu"]["state"] == "succeeded"
    })
    .await;
    assert!(
        v["targets"].get("node-us").is_none(),
        "the us agent was not selected: {v}"
    );
    assert_eq!(v["results"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(
        v["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("hello fleet"),
        "{v}"
    );
    assert_eq!(v["results"][0]["body"]["exit_code"], 0);

    // A failing command on both: exit codes come back, one result per agent.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"nodes": ["node-eu", "node-us"]}, "spec": {"kind": "command", "argv": ["sh", "-c", "exit 3"]}, "timeout_ms": 10000}),
    )
    .await
    .unwrap();
    let id = r.json()["task_id"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| r.json()["task_id"].to_string());
    let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["node-eu"]["state"] == "failed" && v["targets"]["node-us"]["state"] == "failed"
    })
    .await;
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{v}");
    assert!(results.iter().all(|r| r["body"]["exit_code"] == 3), "{v}");

    // A large result travels compressed (agent deflates, scheduler inflates) and arrives whole.
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({"targets": {"nodes": ["node-eu"]}, "spec": {"kind": "command", "argv": ["sh", "-c", "head -c 3000 /dev/zero | tr '\\0' x"]}, "timeout_ms": 10000}),
    )
    .await
    .unwrap();
    let id = r.json()["task_id"].to_string();
    let v = eventually(api, &format!("/v1/tasks/{id}"), |v| {
        v["targets"]["node-eu"]["state"] == "succeeded"
    })
    .await;
    let out = v["results"][0]["body"]["stdout_tail"]
        .as_str()
        .unwrap_or("");
    assert_eq!(out.len(), 3000, "{v}");
    assert!(out.bytes().all(|b| b == b'x'));

    // Every result was acknowledged: both outboxes drain.
    for handle in [&eu, &us] {
        let outbox = std::sync::Arc::clone(handle.outbox());
        for _ in 0..400 {
            if tokio::task::spawn_blocking({
                let outbox = std::sync::Arc::clone(&outbox);
                move || outbox.len().unwrap_or(1)
            })
            .await
            .unwrap()
                == 0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(outbox.len().unwrap(), 0, "outbox drained after acks");
    }
    eu.stop();
    us.stop();
    let _ = eu.join().await;
    let _ = us.join().await;
    fleet.stop().await;
}

/// Runs the real `schedctl` binary; returns exit code and stdout.
/// `schedctl` with the operator key, off the async threads.
fn ctl(api: SocketAddr, args: &[&str]) -> tokio::task::JoinHandle<(i32, String)> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        schedctl(api, KEY, &args)
    })
}

fn schedctl(api: SocketAddr, key: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_schedctl"))
        .env("SCHEDULER_URL", format!("http://{api}"))
        .env("SCHEDULER_API_KEY", key)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn operators_drive_the_fleet_with_schedctl() {
    let fleet = Fleet::start("gw-ctl").await;
    let (api, dir, gateway) = (fleet.sched.addr(), fleet.dir.path(), &fleet.gateway);
    let mut node = agent::start(agent_config(dir, "edge-7", "eu", gateway.addr()))
        .await
        .unwrap();
    eventually(api, "/v1/agents/edge-7", |v| v["state"] == "online").await;

    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(api, KEY, &["agents", "--label", "region=eu"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().next().unwrap_or("").starts_with("NODE"),
        "{out}"
    );
    assert!(
        out.contains("edge-7") && out.contains("online") && out.contains("region=eu"),
        "{out}"
    );

    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            KEY,
            &[
                "run",
                "--label",
                "region=eu",
                "--wait",
                "--",
                "echo",
                "from-schedctl",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("succeeded") && out.contains("from-schedctl"),
        "{out}"
    );

    // --json prints the API's JSON; a failing command makes --wait exit 2.
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            KEY,
            &[
                "--json", "run", "--nodes", "edge-7", "--wait", "--", "sh", "-c", "exit 4",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["targets"]["edge-7"]["state"], "failed");

    // Bad key and bad usage have their own exit codes.
    let (code, _) =
        tokio::task::spawn_blocking(move || schedctl(api, "wrong-key-0123456789", &["agents"]))
            .await
            .unwrap();
    assert_eq!(code, 1);
    let (code, _) =
        tokio::task::spawn_blocking(move || schedctl(api, KEY, &["run", "--wait", "--", "true"]))
            .await
            .unwrap();
    assert_eq!(code, 64, "neither --nodes nor --label");
    node.stop();
    let _ = node.join().await;
    fleet.stop().await;
}

/// `schedctl run --follow` prints a command's lines while it runs: the command below
/// prints one line and then waits for a file the test creates only after that line came
/// through, so without live output the test could not finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_follow_prints_output_while_the_command_runs() {
    use std::io::{BufRead, BufReader};
    let fleet = Fleet::start("gw-follow").await;
    let api = fleet.sched.addr();
    let dir = fleet.dir.path();
    let mut node = fleet.agent("edge-f", "eu").await;

    let release = dir.join("release");
    let script = format!(
        "echo first; echo to-stderr >&2; while [ ! -e {} ]; do sleep 0.05; done; printf 'second\\nno-newline'",
        release.display()
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_schedctl"))
        .env("SCHEDULER_URL", format!("http://{api}"))
        .env("SCHEDULER_API_KEY", KEY)
        .args([
            "run", "--nodes", "edge-f", "--follow", "--", "sh", "-c", &script,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line == "[edge-f] first" {
                let _ = first_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    tokio::task::spawn_blocking(move || first_rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the first line did not arrive while the command was waiting");
    // The command is still running: the line came live, not from the result.
    let tasks = http::get(api, "/v1/tasks", KEY).await.unwrap();
    let task = &tasks.json()["tasks"][0];
    assert_eq!(task["finished"], false, "{task}");
    assert_eq!(task["states"]["running"], 1, "{task}");
    std::fs::write(&release, b"").unwrap();

    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let lines = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{lines:?} {stderr}");
    assert_eq!(
        lines,
        ["[edge-f] first", "[edge-f] second", "[edge-f] no-newline"],
        "{stderr}"
    );
    assert!(stderr.contains("[edge-f] to-stderr"), "{stderr}");
    assert!(stderr.contains("[edge-f] succeeded (exit 0)"), "{stderr}");

    // The kept output is also there as JSON, in order, with offsets.
    let id = task["task_id"].as_u64().unwrap();
    let v = http::get(api, &format!("/v1/tasks/{id}/output"), KEY)
        .await
        .unwrap()
        .json();
    let chunks = v["output"]["edge-f"].as_array().unwrap();
    let stdout: String = chunks
        .iter()
        .filter(|c| c["stream"] == "stdout")
        .map(|c| c["data"].as_str().unwrap())
        .collect();
    assert_eq!(stdout, "first\nsecond\nno-newline");
    // Following a finished task replays what is kept and ends at once.
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            KEY,
            &[
                "--json", "run", "--nodes", "edge-f", "--follow", "--", "echo", "again",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names.last(), Some(&"end"), "{out}");
    assert!(names.contains(&"result"), "{out}");
    node.stop();
    let _ = node.join().await;
    fleet.stop().await;
}

/// A command printing 30 MB: the agent streams a bounded part of it, paced so the
/// gateway never closes its connection for flooding; the follower is told where chunks
/// are missing, and the result still carries the true end of the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_command_streams_a_bounded_paced_part_and_reports_gaps() {
    let fleet = Fleet::start("gw-chatty").await;
    let api = fleet.sched.addr();
    let mut node = fleet.agent("edge-c", "eu").await;
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            KEY,
            &[
                "--json",
                "run",
                "--nodes",
                "edge-c",
                "--follow",
                "--",
                "sh",
                "-c",
                "i=0; while [ $i -lt 2000 ]; do head -c 15000 /dev/zero | tr '\\0' x; i=$((i+1)); done; echo; echo the-end",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let streamed: usize = events
        .iter()
        .filter(|e| e["event"] == "output")
        .map(|e| e["data"]["data"].as_str().unwrap().len())
        .sum();
    assert!(streamed > 0);
    assert!(
        streamed as u64 <= agent::output::MAX_STREAMED_BYTES,
        "{streamed}"
    );
    // 30 MB cannot be streamed whole: gaps are reported, and together with the chunks
    // that arrived they cover every chunk the attempt cut, end included (the result says
    // how many, so a missing end is reported even with no chunk after it).
    assert!(events.iter().any(|e| e["event"] == "gap"), "{out}");
    let mut covered = Vec::new();
    for e in &events {
        match e["event"].as_str() {
            Some("output") => covered.push(e["data"]["seq"].as_u64().unwrap()),
            Some("gap") => covered.extend(
                e["data"]["from_seq"].as_u64().unwrap()..=e["data"]["to_seq"].as_u64().unwrap(),
            ),
            _ => {}
        }
    }
    let cut = events.iter().find(|e| e["event"] == "result").unwrap()["data"]["output_chunks"]
        .as_u64()
        .unwrap();
    assert_eq!(covered, (0..cut).collect::<Vec<_>>());
    let result = events.iter().find(|e| e["event"] == "result").unwrap();
    assert!(
        result["data"]["stdout_tail"]
            .as_str()
            .unwrap()
            .ends_with("x\nthe-end\n"),
        "{result}"
    );
    // One session throughout: the gateway never cut the agent off for its frame rate.
    assert_eq!(node.metrics().sessions(), 1);
    assert!(node.metrics().connected());
    node.stop();
    let _ = node.join().await;
    fleet.stop().await;
}

/// Waits until `node` runs `version` of `name` (status `applied`); returns the status.
async fn config_applied(
    api: SocketAddr,
    name: &str,
    node: &str,
    version: u64,
) -> serde_json::Value {
    eventually(api, &format!("/v1/configs/{name}/status"), |v| {
        v["desired_version"] == version
            && v["nodes"].as_array().is_some_and(|nodes| {
                nodes.iter().any(|n| {
                    n["node_id"] == node
                        && n["state"] == "applied"
                        && n["applied_version"] == version
                })
            })
    })
    .await
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
}

/// Config push end to end: a document to a label selector is written on the matching
/// agent only, acked, shown per node, its reload runs; a second version replaces it, a
/// rollback brings the first back; history, get and status through `schedctl`; every
/// change audited; bad input is a 4xx JSON error that changes nothing, and a read key
/// can read but not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_versions_are_applied_acked_shown_and_rolled_back() {
    let fleet = Fleet::start("gw-config").await;
    let api = fleet.sched.addr();
    let mut eu = fleet.config_agent("edge-a", "eu").await;
    let mut us = fleet.config_agent("edge-b", "us").await;
    let marker = fleet.dir.path().join("reloads.log");
    let reload = json!([
        "sh",
        "-c",
        "echo \"reloaded $0\" >> \"$1\"",
        "{file}",
        marker.to_str().unwrap()
    ]);

    let r = http::post_json(
        api,
        "/v1/configs/app.conf",
        KEY,
        &json!({"content": "v1\n", "targets": {"labels": {"region": "eu"}}, "reload": reload}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    assert_eq!(r.json()["version"], 1);
    assert_eq!(r.json()["nodes"], json!(["edge-a"]));
    assert_eq!(r.json()["pushed"], 1);
    let status = config_applied(api, "app.conf", "edge-a", 1).await;
    assert_eq!(
        status["counts"],
        json!({"applied": 1, "pending": 0, "failed": 0})
    );
    let target = fleet.etc("edge-a").join("app.conf");
    assert_eq!(read(&target), "v1\n");
    assert!(
        !fleet.etc("edge-b").join("app.conf").exists(),
        "edge-b is not in region eu"
    );
    assert_eq!(
        read(&marker).trim(),
        format!("reloaded {}", target.display()),
        "reload ran with the final path"
    );

    // A second version through schedctl, from a file.
    let file = fleet.dir.path().join("app-v2.conf");
    std::fs::write(&file, "v2\n").unwrap();
    let f = file.to_str().unwrap().to_owned();
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            KEY,
            &[
                "config",
                "set",
                "app.conf",
                "--file",
                &f,
                "--selector",
                "region=eu",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("version 2"), "{out}");
    config_applied(api, "app.conf", "edge-a", 2).await;
    assert_eq!(read(&target), "v2\n");

    // Rollback: version 1 is desired again and goes back on the agent.
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(api, KEY, &["config", "rollback", "app.conf", "--to", "1"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    config_applied(api, "app.conf", "edge-a", 1).await;
    assert_eq!(read(&target), "v1\n");

    let (code, out) =
        tokio::task::spawn_blocking(move || schedctl(api, KEY, &["config", "history", "app.conf"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{out}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with('1') && rows[0].trim_end().ends_with('*'),
        "{out}"
    );
    assert!(
        rows[1].starts_with('2') && !rows[1].trim_end().ends_with('*'),
        "{out}"
    );
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            READ_KEY,
            &["config", "get", "app.conf", "--version", "2"],
        )
    })
    .await
    .unwrap();
    assert_eq!((code, out.as_str()), (0, "v2\n"));
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(api, READ_KEY, &["config", "status", "app.conf"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("desired version 1"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("edge-a"))
        .unwrap_or_default();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["edge-a", "applied", "1", "1", "online"],
        "{out}"
    );

    // Every change is audited, with the key's name.
    let audit = http::get(api, "/v1/audit", KEY).await.unwrap().json();
    let actions: Vec<(String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let ops = |a: &str| (a.to_owned(), "ops".to_owned());
    assert_eq!(
        actions,
        [ops("config.set"), ops("config.set"), ops("config.rollback")]
    );

    // Bad input: a 4xx JSON error each time, and nothing changes.
    let bad: [(&str, &str, serde_json::Value, u16); 8] = [
        (
            "POST",
            "/v1/configs/..%2Fescape",
            json!({"content": "x", "targets": {"nodes": ["edge-a"]}}),
            400,
        ),
        (
            "POST",
            "/v1/configs/.hidden",
            json!({"content": "x", "targets": {"nodes": ["edge-a"]}}),
            400,
        ),
        (
            "POST",
            "/v1/configs/app.conf",
            json!({"content": "x", "targets": {"nodes": []}}),
            400,
        ),
        (
            "POST",
            "/v1/configs/app.conf",
            json!({"content": "x", "targets": {"nodes": ["nobody"]}}),
            400,
        ),
        (
            "POST",
            "/v1/configs/app.conf",
            json!({"content": "x", "targets": {"labels": {"region": "mars"}}}),
            400,
        ),
        (
            "POST",
            "/v1/configs/app.conf",
            json!({"content": "x", "targets": {"nodes": ["edge-a"]}, "validate": []}),
            400,
        ),
        (
            "POST",
            "/v1/configs/app.conf",
            json!({"content": "x", "targets": {"nodes": ["edge-a"]}, "bogus": 1}),
            400,
        ),
        (
            "POST",
            "/v1/configs/app.conf/rollback",
            json!({"to": 99}),
            404,
        ),
    ];
    for (method, path, body, want) in &bad {
        let r = http::request_json(api, method, path, KEY, body)
            .await
            .unwrap();
        assert_eq!(r.status, *want, "{path} {body}: {:?}", r.json());
        assert!(r.json()["error"].is_string(), "{path}: {:?}", r.json());
    }
    let r = http::post_json(
        api,
        "/v1/configs/app.conf/rollback",
        KEY,
        &json!({"to": "one"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400, "{:?}", r.json());
    // A read key may read, not write.
    let r = http::post_json(
        api,
        "/v1/configs/app.conf",
        READ_KEY,
        &json!({"content": "x", "targets": {"nodes": ["edge-a"]}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.json());
    let r = http::post_json(
        api,
        "/v1/configs/app.conf/rollback",
        READ_KEY,
        &json!({"to": 2}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.json());
    let history = http::get(api, "/v1/configs/app.conf/history", READ_KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(
        (
            history["latest_version"].as_u64(),
            history["desired_version"].as_u64()
        ),
        (Some(2), Some(1)),
        "{history}"
    );
    let audit = http::get(api, "/v1/audit", KEY).await.unwrap().json();
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(3),
        "{audit}"
    );
    assert_eq!(
        http::get(api, "/v1/configs/nothing", KEY)
            .await
            .unwrap()
            .status,
        404
    );
    assert!(!fleet.dir.path().join("escape").exists());
    assert_eq!(read(&target), "v1\n");

    eu.stop();
    us.stop();
    let _ = eu.join().await;
    let _ = us.join().await;
    fleet.stop().await;
}

/// An agent that was offline when a version was set gets it when it comes back, and one
/// whose file was changed locally gets the desired version again at its next register
/// (it reports the hash of what is on disk, from the state it kept across the restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_or_drifted_agent_converges_when_it_reconnects() {
    let fleet = Fleet::start("gw-drift").await;
    let api = fleet.sched.addr();
    let mut node = fleet.config_agent("edge-d", "eu").await;
    let r = http::post_json(
        api,
        "/v1/configs/svc.yaml",
        KEY,
        &json!({"content": "one: 1\n", "targets": {"nodes": ["edge-d"]}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    config_applied(api, "svc.yaml", "edge-d", 1).await;
    let target = fleet.etc("edge-d").join("svc.yaml");
    assert_eq!(read(&target), "one: 1\n");

    // Offline while version 2 is set: it stays pending on version 1.
    node.stop();
    let _ = node.join().await;
    drop(node); // closes its outbox, which the restarted agent opens
    eventually(api, "/v1/agents/edge-d", |v| v["state"] == "offline").await;
    let r = http::post_json(
        api,
        "/v1/configs/svc.yaml",
        KEY,
        &json!({"content": "two: 2\n", "targets": {"nodes": ["edge-d"]}}),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["pushed"], 0, "{:?}", r.json());
    let status = http::get(api, "/v1/configs/svc.yaml/status", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(status["nodes"][0]["state"], "pending", "{status}");
    assert_eq!(status["nodes"][0]["applied_version"], 1, "{status}");
    assert_eq!(read(&target), "one: 1\n");

    // Back online: it converges to version 2.
    let mut node = fleet.config_agent("edge-d", "eu").await;
    config_applied(api, "svc.yaml", "edge-d", 2).await;
    assert_eq!(read(&target), "two: 2\n");
    node.stop();
    let _ = node.join().await;
    drop(node);

    // Drift: someone edits the file while the agent is down; the restarted agent reports
    // version 2 with another hash and gets version 2 pushed again.
    std::fs::write(&target, "two: 22 # local edit\n").unwrap();
    let mut node = fleet.config_agent("edge-d", "eu").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while read(&target) != "two: 2\n" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never restored: {}",
            read(&target)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    config_applied(api, "svc.yaml", "edge-d", 2).await;
    node.stop();
    let _ = node.join().await;
    fleet.stop().await;
}

/// Publishes `body` on `node`'s agent channel as a push on `route`, bypassing the
/// scheduler (a forger with bus access).
async fn push_raw(nats: &str, node: &str, route: &str, body: Vec<u8>) {
    use messages::envelope::PushEnvelope;
    let client = async_nats::connect(nats).await.unwrap();
    let push = PushEnvelope::new(
        7,
        messages::Route::new(route).unwrap(),
        messages::BodyCodec::MsgPack,
    );
    client
        .publish_with_headers(
            messages::subject::agent(&messages::UserId::new(node).unwrap()),
            push.to_headers(),
            body.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

/// A failing validate leaves the old file untouched and the node `failed` with the
/// error; unsigned and forged config pushes are refused like forged tasks, and a signed
/// push whose name is a path is refused and reported without writing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_and_a_failing_validate_keeps_the_old_file() {
    use messages::fleet::{self, ConfigPush};
    let fleet = Fleet::start("gw-badcfg").await;
    let api = fleet.sched.addr();
    let mut node = fleet.config_agent("edge-s", "eu").await;
    let validate = json!(["sh", "-c", "grep -q '^good' \"$0\"", "{file}"]);
    let set = |content: &str| json!({"content": content, "targets": {"nodes": ["edge-s"]}, "validate": validate});
    let r = http::post_json(api, "/v1/configs/app.conf", KEY, &set("good\n"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    config_applied(api, "app.conf", "edge-s", 1).await;
    let etc = fleet.etc("edge-s");
    let target = etc.join("app.conf");

    let r = http::post_json(api, "/v1/configs/app.conf", KEY, &set("bad\n"))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let status = eventually(api, "/v1/configs/app.conf/status", |v| {
        v["nodes"][0]["state"] == "failed"
    })
    .await;
    let error = status["nodes"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("validate failed") && error.contains("exit 1"),
        "{status}"
    );
    assert_eq!(status["nodes"][0]["applied_version"], 1, "{status}");
    assert_eq!(status["counts"]["failed"], 1, "{status}");
    assert_eq!(read(&target), "good\n", "the old file is untouched");
    let entries: Vec<String> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, ["app.conf"], "no temp file left behind");

    // Forgeries with bus access: unsigned, then signed with a key the agent does not pin.
    let nats = fleet.nats.url();
    let evil = |name: &str| {
        let content = b"evil\n".to_vec();
        messages::payload::to_bus(&ConfigPush {
            name: name.to_owned(),
            version: 9,
            sha256: fleet::config_sha256(&content),
            content,
            validate: None,
            reload: None,
        })
        .unwrap()
    };
    push_raw(&nats, "edge-s", fleet::down::CONFIG, evil("app.conf")).await;
    let stranger = messages::command::CommandSigner::generate();
    let (forged, _) = stranger
        .sign(
            "edge-s",
            fleet::down::CONFIG,
            evil("app.conf"),
            servicekit::clock::now_ms(),
            60_000,
        )
        .unwrap();
    push_raw(&nats, "edge-s", fleet::down::CONFIG, forged).await;
    // Genuinely signed, but its name is a path out of config_dir.
    let signer = messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap();
    let (escape, _) = signer
        .sign(
            "edge-s",
            fleet::down::CONFIG,
            evil("../escape.conf"),
            servicekit::clock::now_ms(),
            60_000,
        )
        .unwrap();
    push_raw(&nats, "edge-s", fleet::down::CONFIG, escape).await;
    let refusals = eventually(api, "/v1/agents/edge-s/refusals", |v| {
        v["refusals"].as_array().is_some_and(|r| r.len() == 3)
    })
    .await;
    let reasons: Vec<&str> = refusals["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["refused"]["reason"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(reasons, ["unsigned", "unknown_key", "body"], "{refusals}");
    assert!(
        refusals["refusals"][2]["refused"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unsafe config name"),
        "{refusals}"
    );
    assert!(
        refusals["refusals"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["refused"]["route"] == "agent.config")
    );
    assert_eq!(read(&target), "good\n");
    assert!(!fleet.dir.path().join("escape.conf").exists());
    assert_eq!(node.metrics().commands_refused(), 3);
    node.stop();
    let _ = node.join().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_every_second_schedule_fires_once_per_period_and_runs_on_a_real_agent() {
    let fleet = Fleet::start("gw-sched").await;
    let api = fleet.sched.addr();
    let mut eu = fleet.agent("node-eu", "eu").await;
    let mut us = fleet.agent("node-us", "us").await;

    // Every second, to the eu selector, created with schedctl.
    let (code, out) = tokio::task::spawn_blocking(move || {
        schedctl(
            api,
            KEY,
            &[
                "--json",
                "schedule",
                "create",
                "--cron",
                "* * * * * *",
                "--selector",
                "region=eu",
                "--",
                "echo",
                "tick",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = created["schedule_id"].as_u64().unwrap();
    let path = format!("/v1/schedules/{id}");

    // It fires, and the task it created runs on node-eu only.
    let v = eventually(api, &path, |v| v["fired"].as_u64() >= Some(3)).await;
    let first_task = v["last_task_id"].as_u64().unwrap();
    let task = eventually(api, &format!("/v1/tasks/{first_task}"), |t| {
        t["targets"]["node-eu"]["state"] == "succeeded"
    })
    .await;
    assert!(task["targets"].get("node-us").is_none(), "{task}");
    assert!(
        task["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("tick"),
        "{task}"
    );

    // Pause, then count: one audit fire entry per period, in increasing periods, one task
    // each (skip: a period may be skipped while the previous run is unfinished).
    let r = http::post_json(api, &format!("{path}/pause"), KEY, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let audit = http::get(api, "/v1/audit?limit=1000", KEY)
        .await
        .unwrap()
        .json();
    let fires: Vec<&serde_json::Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "schedule.fire")
        .map(|e| &e["detail"])
        .collect();
    let periods: Vec<u64> = fires
        .iter()
        .map(|d| d["period"].as_u64().unwrap())
        .collect();
    assert!(periods.windows(2).all(|w| w[0] < w[1]), "{periods:?}");
    let with_task = fires.iter().filter(|d| d["task_id"].is_u64()).count();
    let tasks = http::get(api, "/v1/tasks?limit=1000", KEY)
        .await
        .unwrap()
        .json();
    let all: Vec<&serde_json::Value> = tasks["tasks"].as_array().unwrap().iter().collect();
    assert_eq!(all.len(), with_task, "one task per fired period: {fires:?}");
    // Paused: nothing more fires.
    let fired = http::get(api, &path, KEY).await.unwrap().json()["fired"].clone();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        http::get(api, &path, KEY).await.unwrap().json()["fired"],
        fired
    );

    // Counted in /metrics.
    let metrics = String::from_utf8(
        http::request(api, "GET", "/metrics", &[], b"")
            .await
            .unwrap()
            .body
            .to_vec(),
    )
    .unwrap();
    let fires_metric = metrics
        .lines()
        .find_map(|l| l.strip_prefix("scheduler_schedule_fires_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(fires_metric, Some(with_task as u64), "{metrics}");
    assert!(metrics.contains("scheduler_schedule_skips_total"));

    // Every task it created finishes on the agent.
    for t in &all {
        let id = t["task_id"].as_u64().unwrap();
        eventually(api, &format!("/v1/tasks/{id}"), |t| t["finished"] == true).await;
    }
    eu.stop();
    us.stop();
    let _ = eu.join().await;
    let _ = us.join().await;
    fleet.stop().await;
}

/// A staged rollout on real agents with schedctl: the pilot runs on one agent and waits for
/// promotion, promote finishes it; a failing command halts in the pilot, a read-only key
/// cannot promote, and abort ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_waits_for_promotion_and_halts_on_failures_with_schedctl() {
    let fleet = Fleet::start("gw-rollout").await;
    let api = fleet.sched.addr();
    let mut agents = Vec::new();
    for n in ["ro-1", "ro-2", "ro-3"] {
        agents.push(fleet.agent(n, "eu").await);
    }
    let (code, out) = ctl(
        api,
        &[
            "--json",
            "rollout",
            "start",
            "--selector",
            "region=eu",
            "--stages",
            "pilot=1,full=100%",
            "--",
            "echo",
            "rolled",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["rollout_id"]
        .as_u64()
        .unwrap();
    let path = format!("/v1/rollouts/{id}");
    let v = eventually(api, &path, |v| v["state"] == "awaiting_promotion").await;
    assert_eq!(v["stages"][0]["succeeded"], 1, "{v}");
    assert_eq!(v["started"], 1, "only the pilot ran: {v}");
    // The table view shows the stages and their progress.
    let (code, out) = ctl(api, &["rollout", "status", &id.to_string()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("awaiting_promotion") && out.contains("pilot"),
        "{out}"
    );
    assert!(out.contains("[####################] 1/1"), "{out}");
    // A read-only key sees it and cannot promote it.
    let r = http::post_json(api, &format!("{path}/promote"), READ_KEY, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{:?}", r.json());
    let (code, out) = ctl(api, &["rollout", "promote", &id.to_string()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let v = eventually(api, &path, |v| v["state"] == "completed").await;
    assert_eq!(v["succeeded"], 3, "{v}");
    let task = v["history"][1]["task_id"].as_u64().unwrap();
    let t = eventually(api, &format!("/v1/tasks/{task}"), |t| {
        t["targets"].as_object().is_some_and(|m| m.len() == 2)
    })
    .await;
    assert!(
        t["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("rolled"),
        "{t}"
    );

    // A command that fails halts in the pilot; promote is refused (409), abort ends it.
    let (code, out) = ctl(
        api,
        &[
            "--json",
            "rollout",
            "start",
            "--selector",
            "region=eu",
            "--stages",
            "pilot=1,full=100%",
            "--max-failure-percent",
            "0",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["rollout_id"]
        .as_u64()
        .unwrap();
    let path = format!("/v1/rollouts/{id}");
    let v = eventually(api, &path, |v| v["state"] == "halted").await;
    assert!(v["reason"].as_str().unwrap().contains("1 of 1"), "{v}");
    assert_eq!(v["started"], 1, "nothing beyond the pilot: {v}");
    let r = http::post_json(api, &format!("{path}/promote"), KEY, &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.json());
    let (code, out) = ctl(api, &["rollout", "abort", &id.to_string()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("aborted"), "{out}");
    let (code, out) = ctl(api, &["rollout", "list"]).await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("completed") && out.contains("aborted"),
        "{out}"
    );
    for mut a in agents {
        a.stop();
        let _ = a.join().await;
    }
    fleet.stop().await;
}

/// A config version rolled out in stages on real agents: staged (not pushed), the pilot's
/// agent alone gets it while the others keep the desired version, promote takes it to the
/// rest, and on completion it is the desired version; `config set` meanwhile is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_version_rolls_out_in_stages_on_real_agents() {
    let fleet = Fleet::start("gw-config-rollout").await;
    let api = fleet.sched.addr();
    let names = ["cr-1", "cr-2", "cr-3"];
    let mut agents = Vec::new();
    for n in names {
        agents.push(fleet.config_agent(n, "eu").await);
    }
    let r = http::post_json(
        api,
        "/v1/configs/app.conf",
        KEY,
        &json!({"content": "v1\n", "targets": {"labels": {"region": "eu"}}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    for n in names {
        config_applied(api, "app.conf", n, 1).await;
    }
    let file = fleet.dir.path().join("app-v2.conf");
    std::fs::write(&file, "v2\n").unwrap();
    let f = file.to_str().unwrap().to_owned();
    let (code, out) = ctl(
        api,
        &[
            "config",
            "set",
            "app.conf",
            "--file",
            &f,
            "--selector",
            "region=eu",
            "--stage",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("version 2") && out.contains("staged"), "{out}");

    let (code, out) = ctl(
        api,
        &[
            "--json",
            "rollout",
            "start",
            "--selector",
            "region=eu",
            "--config",
            "app.conf",
            "--version",
            "2",
            "--stages",
            "pilot=1,full=100%",
        ],
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["rollout_id"]
        .as_u64()
        .unwrap();
    let path = format!("/v1/rollouts/{id}");
    let v = eventually(api, &path, |v| v["state"] == "awaiting_promotion").await;
    assert_eq!(
        v["config"],
        json!({"name": "app.conf", "version": 2}),
        "{v}"
    );
    assert_eq!(v["history"][0]["config_version"], 2, "{v}");
    let contents: Vec<String> = names
        .iter()
        .map(|n| read(&fleet.etc(n).join("app.conf")))
        .collect();
    assert_eq!(
        contents.iter().filter(|c| *c == "v2\n").count(),
        1,
        "only the pilot runs v2: {contents:?}"
    );
    assert_eq!(
        contents.iter().filter(|c| *c == "v1\n").count(),
        2,
        "{contents:?}"
    );
    // Status shows who wants what; the desired version is still 1.
    let (code, out) = ctl(api, &["config", "status", "app.conf"]).await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("desired version 1"), "{out}");
    let wants: Vec<Vec<String>> = out
        .lines()
        .filter(|l| l.starts_with("cr-"))
        .map(|l| l.split_whitespace().take(4).map(str::to_owned).collect())
        .collect();
    assert_eq!(
        wants
            .iter()
            .filter(|r| r[1] == "applied" && r[2] == "2" && r[3] == "2")
            .count(),
        1,
        "{out}"
    );
    // While it runs, setting the document directly is refused.
    let r = http::post_json(
        api,
        "/v1/configs/app.conf",
        KEY,
        &json!({"content": "v3\n", "targets": {"labels": {"region": "eu"}}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 409, "{:?}", r.json());
    assert_eq!(r.json()["error"], "config_in_rollout", "{:?}", r.json());

    let (code, out) = ctl(api, &["rollout", "promote", &id.to_string()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}");
    let v = eventually(api, &path, |v| v["state"] == "completed").await;
    assert_eq!(v["succeeded"], 3, "{v}");
    for n in names {
        config_applied(api, "app.conf", n, 2).await;
        assert_eq!(read(&fleet.etc(n).join("app.conf")), "v2\n");
    }
    for mut a in agents {
        a.stop();
        let _ = a.join().await;
    }
    fleet.stop().await;
}

/// A result published while no scheduler listens (the active one is gone, the next not yet
/// up) is lost on the bus, but not for good: the agent, still connected, sends what stays
/// unacknowledged again (`resend_after_ms`), and the next scheduler stores it, without
/// the agent reconnecting and without a second attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_lost_while_no_scheduler_listens_is_sent_again_on_the_same_connection() {
    let fleet = Fleet::start("gw-resend").await;
    let api = fleet.sched.addr();
    let config = agent_config_with(
        fleet.dir.path(),
        "resend-1",
        "eu",
        fleet.gateway.addr(),
        "resend_after_ms = 300",
    );
    let mut node = agent::start(config).await.unwrap();
    eventually(api, "/v1/agents/resend-1", |v| v["state"] == "online").await;
    let marker = fleet.dir.path().join("finish");
    let r = http::post_json(
        api,
        "/v1/tasks",
        KEY,
        &json!({
            "targets": {"nodes": ["resend-1"]},
            "spec": {"kind": "command", "argv": ["sh", "-c",
                format!("while [ ! -e '{}' ]; do sleep 0.05; done; echo finished", marker.display())]},
            "timeout_ms": 60000
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 201, "{:?}", r.json());
    let task = r.json()["task_id"].as_u64().unwrap();
    eventually(api, &format!("/v1/tasks/{task}"), |t| {
        t["targets"]["resend-1"]["state"] == "running"
    })
    .await;
    // The scheduler goes away; the command finishes and its result goes nowhere.
    let Fleet {
        nats: _nats,
        gateway,
        sched,
        dir,
    } = fleet;
    sched.shutdown().await.unwrap();
    std::fs::write(&marker, b"").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The next scheduler (same store) gets the result from the same connection.
    let config = scheduler_config(&_nats.url(), dir.path());
    let sched = scheduler::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    ready(sched.addr()).await;
    let t = eventually(sched.addr(), &format!("/v1/tasks/{task}"), |t| {
        t["targets"]["resend-1"]["state"] == "succeeded"
    })
    .await;
    assert_eq!(t["targets"]["resend-1"]["attempts"], 1, "{t}");
    assert!(
        t["results"][0]["body"]["stdout_tail"]
            .as_str()
            .unwrap_or("")
            .contains("finished"),
        "{t}"
    );
    assert_eq!(node.metrics().sessions(), 1, "the agent never reconnected");
    node.stop();
    let _ = node.join().await;
    sched.shutdown().await.unwrap();
    gateway.shutdown().await.unwrap();
}
