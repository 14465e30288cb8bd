#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! One trace per message across every hop, with the real processes: nats-server, ws-gateway,
//! ws-api, scheduler and an agent, each exporting spans over OTLP/HTTP to a receiver this
//! test runs. Bodies are deliberately undecodable (no hop may look inside them) and the
//! trace must still be whole, with every parent link right.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use messages::{BodyCodec, Frame, FrameKind, Route, TraceContext};
use testkit::otlp::{Receiver, Span, kind};
use testkit::process::{Process, binary, free_addr};
use testkit::ws::{TEST_SECRET, TestClient, token};
use testkit::{NatsServer, http};

const KEY: &str = "trace-test-key-0123456789";
/// Not valid MessagePack, JSON or UTF-8: any hop that tried to decode it would fail.
const UNDECODABLE: &[u8] = &[0xc1, 0xff, 0x00, 0xfe, 0xc1];

/// The settings every process gets: where to export, and a short batch delay so spans
/// arrive within the test.
fn otel_env(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("RUST_LOG", "warn".into()),
    ]
}

struct System {
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    gateway: std::net::SocketAddr,
    api: std::net::SocketAddr,
    scheduler: std::net::SocketAddr,
    nats_url: String,
    procs: Vec<Process>,
}

impl System {
    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(Process::log)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn start(receiver: &Receiver) -> System {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nats_url = nats.url();
    let (gateway, api, scheduler) = (free_addr(), free_addr(), free_addr());
    let env = otel_env(receiver);
    let with = |extra: &[(&'static str, String)]| {
        let mut all = env.clone();
        all.extend_from_slice(extra);
        all
    };
    let keys = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let agent_token_pub = keys("agent-token.pub", testkit::ws::TEST_AGENT_TOKEN_PUBLIC);
    let command_key = keys("command.key", testkit::ws::TEST_COMMAND_KEY);
    let command_pub = keys("command.pub", testkit::ws::TEST_COMMAND_PUBLIC);
    let mut procs = vec![
        Process::start(
            &binary("ws-gateway", "ws-gateway"),
            &[],
            &with(&[
                ("WS_GATEWAY_LISTEN", gateway.to_string()),
                ("WS_GATEWAY_NATS_URL", nats_url.clone()),
                ("WS_GATEWAY_INSTANCE", "gw-trace".into()),
                ("WS_GATEWAY_JWT_HS256_SECRET", TEST_SECRET.into()),
                ("WS_GATEWAY_AGENT_TOKEN_PUBLIC_KEY_FILE", agent_token_pub),
            ]),
            dir.path().join("gateway.log"),
        ),
        Process::start(
            &binary("ws-api", "ws-api"),
            &[],
            &with(&[
                ("WS_API_LISTEN", api.to_string()),
                ("WS_API_NATS_URL", nats_url.clone()),
                ("WS_API_KEYS", KEY.into()),
            ]),
            dir.path().join("api.log"),
        ),
        Process::start(
            &binary("scheduler", "scheduler"),
            &[],
            &with(&[
                ("SCHEDULER_LISTEN", scheduler.to_string()),
                ("SCHEDULER_NATS_URL", nats_url.clone()),
                ("SCHEDULER_API_KEYS", KEY.into()),
                (
                    "SCHEDULER_DB",
                    dir.path().join("s.redb").display().to_string(),
                ),
                ("SCHEDULER_COMMAND_KEY_FILE", command_key),
            ]),
            dir.path().join("scheduler.log"),
        ),
    ];
    for addr in [gateway, api, scheduler] {
        http::wait_status(addr, "/readyz", 200).await;
    }
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"edge-1\"\ntoken = \"{}\"\ngateways = [\"ws://{gateway}/ws\"]\noutbox_path = \"{}\"\nallowed_commands = [\"echo\"]\ncommand_keys_file = \"{command_pub}\"\n",
            token("edge-1", Some("agent"), &[]),
            dir.path().join("outbox.redb").display()
        ),
    )
    .unwrap();
    procs.push(Process::start(
        &binary("agent", "agent"),
        &[config.to_str().unwrap()],
        &env,
        dir.path().join("agent.log"),
    ));
    System {
        _nats: nats,
        _dir: dir,
        gateway,
        api,
        scheduler,
        nats_url,
        procs,
    }
}

/// The spans of one trace, by span id.
fn trace_of(spans: &[Span], trace_id: &str) -> HashMap<String, Span> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .map(|s| (s.span_id.clone(), s.clone()))
        .collect()
}

/// The one span of `service` named `name` in `trace`.
fn find<'a>(trace: &'a HashMap<String, Span>, service: &str, name: &str) -> &'a Span {
    let found: Vec<_> = trace
        .values()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one {service} span {name:?}, trace has: {:#?}",
        trace
            .values()
            .map(|s| (&s.service, &s.name))
            .collect::<Vec<_>>()
    );
    found[0]
}

fn assert_child(child: &Span, parent: &Span) {
    assert_eq!(
        child.parent_span_id, parent.span_id,
        "{}/{} should be the child of {}/{}",
        child.service, child.name, parent.service, parent.name
    );
}

fn names_present(spans: &[Span], trace_id: &str, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(service, name)| {
        spans
            .iter()
            .any(|s| s.trace_id == trace_id && s.service == *service && s.name == *name)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_an_upstream_message_and_an_agent_task_each_make_one_whole_trace() {
    let receiver = Receiver::start().await.unwrap();
    let system = start(&receiver).await;
    let mut client = TestClient::connect(system.gateway, &token("alice", None, &[]))
        .await
        .unwrap();

    // --- A push: ws-api is the edge (no traceparent from the caller) and starts the trace.
    let response = http::request(
        system.api,
        "POST",
        "/v1/push?user=alice&receipt=1&route=news",
        &[
            ("authorization", &format!("Bearer {KEY}")),
            ("content-type", "application/octet-stream"),
        ],
        UNDECODABLE,
    )
    .await
    .unwrap();
    assert_eq!(
        response.status,
        202,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let trace_id = response.json()["trace_id"].as_str().unwrap().to_owned();
    let push = client.frame().await;
    assert_eq!(push.kind, FrameKind::Push);
    assert_eq!(&push.body[..], UNDECODABLE, "the body arrives untouched");
    let delivered = push
        .trace
        .expect("the push frame carries the trace context");
    assert_eq!(delivered.trace_id_hex(), trace_id);
    // The client acknowledges within the trace it was given.
    client
        .send(
            &Frame::new(FrameKind::Ack)
                .with_msg_id(push.msg_id)
                .with_trace(Some(delivered)),
        )
        .await;

    let want = [
        ("ws-api", "POST /v1/push"),
        ("ws-api", "publish ws.user"),
        ("ws-gateway", "process ws.user"),
        ("ws-gateway", "publish ws.evt.app.ack"),
        ("ws-api", "process ws.evt.app.ack"),
    ];
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            names_present(s, &trace_id, &want)
        })
        .await;
    let trace = trace_of(&spans, &trace_id);
    let request = find(&trace, "ws-api", "POST /v1/push");
    let publish = find(&trace, "ws-api", "publish ws.user");
    let deliver = find(&trace, "ws-gateway", "process ws.user");
    let ack = find(&trace, "ws-gateway", "publish ws.evt.app.ack");
    let acked = find(&trace, "ws-api", "process ws.evt.app.ack");
    assert_eq!(request.kind, kind::SERVER);
    assert!(
        request.parent_span_id.is_empty(),
        "the API request is the root"
    );
    assert_eq!(
        (publish.kind, deliver.kind),
        (kind::PRODUCER, kind::CONSUMER)
    );
    assert_child(publish, request);
    assert_child(deliver, publish);
    assert_eq!(
        delivered.span_id,
        hex16(&deliver.span_id),
        "clients get the delivery span"
    );
    assert_child(ack, deliver);
    assert_child(acked, ack);
    assert_eq!(
        deliver.attr("messaging.destination.name"),
        Some("ws.user.alice")
    );
    assert_eq!(deliver.attr("messaging.system"), Some("nats"));
    assert_eq!(deliver.attr("messaging.operation.type"), Some("process"));

    // --- An upstream message: the client sends its own trace context; the gateway continues
    // it, ws-api forwards to the product subject, all without decoding the body.
    let nats = async_nats::connect(&system.nats_url).await.unwrap();
    let mut product = nats.subscribe("app.chat.send").await.unwrap();
    nats.flush().await.unwrap();
    let client_span = TraceContext {
        trace_id: *b"client-trace-id!",
        span_id: *b"clspan01",
        flags: TraceContext::SAMPLED,
    };
    client
        .send(
            &Frame::new(FrameKind::Publish)
                .with_msg_id(7)
                .with_route(Route::new("chat.send").unwrap())
                .with_body(BodyCodec::Raw, Bytes::from_static(UNDECODABLE))
                .with_trace(Some(client_span)),
        )
        .await;
    let forwarded = tokio::time::timeout(Duration::from_secs(10), product.next())
        .await
        .expect("the product service receives the message")
        .unwrap();
    assert_eq!(&forwarded.payload[..], UNDECODABLE);
    let carried = TraceContext::extract(forwarded.headers.as_ref().unwrap()).unwrap();
    assert_eq!(carried.trace_id, client_span.trace_id);
    let trace_id = client_span.trace_id_hex();
    let want = [
        ("ws-gateway", "publish ws.msg.app.chat.send"),
        ("ws-api", "process ws.msg.app.chat.send"),
        ("ws-api", "publish app.chat.send"),
    ];
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            names_present(s, &trace_id, &want)
        })
        .await;
    let trace = trace_of(&spans, &trace_id);
    let published = find(&trace, "ws-gateway", "publish ws.msg.app.chat.send");
    let processed = find(&trace, "ws-api", "process ws.msg.app.chat.send");
    let to_product = find(&trace, "ws-api", "publish app.chat.send");
    assert_eq!(
        published.parent_span_id,
        hex(&client_span.span_id),
        "continues the client's span"
    );
    assert_child(processed, published);
    assert_child(to_product, processed);
    assert_eq!(
        carried.span_id,
        hex16(&to_product.span_id),
        "the product service gets the last hop"
    );

    // --- An agent task: the scheduler's API call starts the trace; the task travels through
    // the gateway to the agent, and its result comes back within the same trace.
    http::eventually(system.scheduler, "/v1/agents/edge-1", KEY, |v| {
        v["state"] == "online"
    })
    .await;
    let created = http::post_json(
        system.scheduler,
        "/v1/tasks",
        KEY,
        &serde_json::json!({
            "targets": { "nodes": ["edge-1"] },
            "spec": { "kind": "command", "argv": ["echo", "traced"] }
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let trace_id = created.json()["trace_id"].as_str().unwrap().to_owned();
    let want = [
        ("scheduler", "POST /v1/tasks"),
        ("scheduler", "publish ws.agent"),
        ("ws-gateway", "process ws.agent"),
        ("agent", "process agent.task"),
        ("ws-gateway", "publish ws.msg.agent.agent.task.result"),
        ("scheduler", "process ws.msg.agent.agent.task.result"),
    ];
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            names_present(s, &trace_id, &want)
        })
        .await;
    let trace = trace_of(&spans, &trace_id);
    if !names_present(&spans, &trace_id, &want) {
        panic!("incomplete task trace: {trace:#?}\n{}", system.logs());
    }
    let request = find(&trace, "scheduler", "POST /v1/tasks");
    let dispatch = find(&trace, "scheduler", "publish ws.agent");
    let deliver = find(&trace, "ws-gateway", "process ws.agent");
    let execute = find(&trace, "agent", "process agent.task");
    let result = find(
        &trace,
        "ws-gateway",
        "publish ws.msg.agent.agent.task.result",
    );
    let stored = find(
        &trace,
        "scheduler",
        "process ws.msg.agent.agent.task.result",
    );
    assert_child(dispatch, request);
    assert_child(deliver, dispatch);
    assert_child(execute, deliver);
    assert_child(result, execute);
    assert_child(stored, result);
    assert!(execute.end_ns >= execute.start_ns);

    // Every metric the shipped Grafana dashboard queries exists in some service's /metrics.
    let mut exposed = String::new();
    for addr in [system.gateway, system.api, system.scheduler] {
        exposed.push_str(&String::from_utf8_lossy(
            &http::get(addr, "/metrics", "").await.unwrap().body,
        ));
    }
    let dashboard = std::fs::read_to_string(
        testkit::workspace_root().join("deploy/grafana/realtime-dashboard.json"),
    )
    .unwrap();
    for name in metric_names(&dashboard) {
        let base = name
            .strip_suffix("_total")
            .or_else(|| name.strip_suffix("_bucket"))
            .unwrap_or(&name);
        assert!(
            exposed.contains(&format!("# TYPE {base} ")),
            "the dashboard queries {name}, which no service exposes"
        );
    }
}

/// Metric names (`ws_gateway_*`, `ws_api_*`, `scheduler_*`) mentioned in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for prefix in ["ws_gateway_", "ws_api_", "scheduler_"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex16(s: &str) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).unwrap();
    }
    out
}
