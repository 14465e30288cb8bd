//! The JavaScript client library (`clients/js`) against the real stack: its Node unit
//! tests, the library under Node against a real gateway, and the library in a real
//! headless Chromium (driven over WebDriver) against a real nats-server, gateway and
//! ws-api: connect, a push from ws-api with a receipt, publish with ack, joins (granted and
//! refused), a room push, a compressed push, the JSON codec, heartbeats following the
//! gateway's acks, a gateway drain with the reconnect, the rejoin and a room push after it,
//! a leave, and a terminal close code.
//!
//! Node or Chromium missing on a developer machine skips the test that needs it with a
//! message; `.ci/run` installs both, so CI runs everything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use messages::envelope::PushEnvelope;
use messages::payload::{GatewayControl, encode_body};
use messages::{BodyCodec, Route, SocketId};
use serde_json::{Value, json};
use testkit::NatsServer;
use testkit::browser::{Browser, StaticServer};
use testkit::http;
use testkit::ws::token;

const KEY: &str = "test-api-key-0123456789";
const WAIT: Duration = Duration::from_secs(15);

fn js_dir() -> PathBuf {
    testkit::workspace_root().join("clients/js")
}

/// `node` if it is installed, else `None` (the caller says why it skips).
fn node() -> Option<PathBuf> {
    let node = std::env::var_os("NODE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("node"));
    let ok = Command::new(&node)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(node)
}

async fn api(nats: &str) -> ws_api::Handle {
    let mut config = ws_api::Config::new(nats, vec![KEY.to_owned()]);
    config.open_room_prefixes = vec!["public.".into()];
    let handle = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(handle.addr(), "/readyz", 200).await;
    handle
}

async fn push(api: SocketAddr, body: Value) -> Value {
    let r = http::post_json(api, "/v1/push", KEY, &body).await.unwrap();
    assert_eq!(r.status, 202, "{:?}", r.json());
    r.json()
}

#[test]
fn the_node_unit_tests_pass() {
    let Some(node) = node() else {
        eprintln!("SKIPPED: node is not installed (apt-get install nodejs; .ci/run does)");
        return;
    };
    let out = Command::new(node)
        .args(["--test", "test/"])
        .current_dir(js_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A summary line like "# pass 38": the runner found and ran the tests.
    assert!(stdout.contains("# fail 0"), "{stdout}");
}

#[tokio::test]
async fn the_library_works_under_node_against_a_real_gateway() {
    let Some(node) = node() else {
        eprintln!("SKIPPED: node is not installed (apt-get install nodejs; .ci/run does)");
        return;
    };
    // Node 20 has a WebSocket global only behind this flag; Node 22 has it by default and
    // still accepts the flag.
    let flag_works = Command::new(&node)
        .args([
            "--experimental-websocket",
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !flag_works {
        eprintln!("SKIPPED: this node has no WebSocket (needs Node >= 20.10)");
        return;
    }
    let nats = NatsServer::start().unwrap();
    let gw = testkit::gateway::start(testkit::gateway::config(&nats.url(), "gw-node")).await;
    let api = api(&nats.url()).await;
    let out = tokio::process::Command::new(node)
        .args([
            "--experimental-websocket",
            "--test",
            "test/node-gateway.test.js",
        ])
        .env("RT_GATEWAY_URL", format!("ws://{}/ws", gw.addr()))
        .env("RT_TOKEN", token("nora", None, &[]))
        .current_dir(js_dir())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("# pass 1"),
        "node client test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}

/// Runs `window.call(client, method, ...args)` in the page: "ok" or the error's fields.
async fn call(browser: &Browser, client: &str, method: &str, args: Value) -> Value {
    let mut all = vec![json!(client), json!(method)];
    all.extend(args.as_array().cloned().unwrap_or_default());
    browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             window.call(...Array.from(arguments).slice(0, -1)).then(done);",
            Value::Array(all),
        )
        .await
        .unwrap()
}

async fn pushes(browser: &Browser, client: &str, at_least: usize) -> Vec<Value> {
    let expr = format!("window.clients.{client}.pushes.length >= {at_least}");
    if let Err(e) = browser.wait_for(&expr, WAIT).await {
        let log = browser
            .execute("return document.getElementById('log').innerText", json!([]))
            .await;
        panic!("{e}; page log: {log:?}");
    }
    let v = browser
        .execute(&format!("return window.clients.{client}.pushes"), json!([]))
        .await
        .unwrap();
    v.as_array().cloned().unwrap_or_default()
}

async fn events_of(browser: &Browser, client: &str, kind: &str) -> Vec<Value> {
    let v = browser
        .execute(
            &format!("return window.clients.{client}.events.filter(e => e.type === '{kind}')"),
            json!([]),
        )
        .await
        .unwrap();
    v.as_array().cloned().unwrap_or_default()
}

async fn welcome_heartbeat(browser: &Browser) -> Value {
    browser
        .execute(
            "return window.clients.alice.client.welcome.heartbeat.baseMs",
            json!([]),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn the_library_works_in_a_real_browser_against_a_real_gateway() {
    let Some(browser) = Browser::start().await.unwrap() else {
        eprintln!(
            "SKIPPED: chromium or chromedriver is not installed \
             (apt-get install chromium chromium-driver; .ci/run does)"
        );
        return;
    };
    let nats = NatsServer::start().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let gw_addr = listener.local_addr().unwrap();
    // Short heartbeats, so the test sees the browser beat on schedule and follow the
    // growing interval of the acks: 800 ms, +400 ms after every 2 on-time beats. The grace
    // is wide so a loaded machine delaying the page's timers does not close the session.
    let gw_config = || {
        let mut config = testkit::gateway::config(&nats.url(), "gw-browser");
        config.heartbeat = messages::payload::HeartbeatParams {
            base_ms: 800,
            step_ms: 400,
            max_ms: 1600,
            grow_after: 2,
            grace_ms: 2000,
        };
        config
    };
    let gw = testkit::gateway::start_on(gw_config(), listener).await;
    let api = api(&nats.url()).await;
    let site = StaticServer::start(js_dir()).await.unwrap();
    let bus = async_nats::connect(nats.url()).await.unwrap();

    browser
        .goto(&format!("{}/test/browser.html", site.url()))
        .await
        .unwrap();
    browser
        .wait_for("window.pageReady === true", WAIT)
        .await
        .unwrap();
    let ws_url = format!("ws://{gw_addr}/ws");
    let start = "const [name, url, token, codec, done] = arguments;
                 window.startClient(name, url, token, codec).then(done, e => done({error: String(e)}));";

    // Connect: the token travels as a query parameter, the welcome is read.
    let alice = token("alice", None, &["chat.lobby"]);
    let welcome = browser
        .execute_async(start, json!(["alice", ws_url, alice, "msgpack"]))
        .await
        .unwrap();
    assert_eq!(welcome["userId"], "alice", "{welcome}");
    assert_eq!(welcome["gateway"], "gw-browser");
    let socket_id = welcome["socketId"].as_str().unwrap().to_owned();
    assert!(socket_id.parse::<u64>().is_ok(), "{welcome}");

    // A push from ws-api asking for a receipt: delivered, decoded, and acked automatically.
    let r = push(
        api.addr(),
        json!({"target": {"users": ["alice"]}, "route": "greet", "body": {"hello": "browser"}, "receipt": true}),
    )
    .await;
    let push_id = r["push_id"].as_str().unwrap().to_owned();
    let got = pushes(&browser, "alice", 1).await;
    assert_eq!(
        got[0],
        json!({"route": "greet", "id": push_id, "codec": "json", "body": {"hello": "browser"}, "receipt": true})
    );
    http::eventually(api.addr(), &format!("/v1/pushes/{push_id}"), KEY, |v| {
        v["acked"] == 1
    })
    .await;

    // Publish: the promise settles with the gateway's ack; the bus carries the body as is.
    let mut upstream = bus.subscribe("ws.msg.app.chat.send").await.unwrap();
    bus.flush().await.unwrap();
    let sent = call(
        &browser,
        "alice",
        "publish",
        json!(["chat.send", {"text": "hi"}]),
    )
    .await;
    assert_eq!(sent, "ok");
    let msg = tokio::time::timeout(WAIT, upstream.next())
        .await
        .unwrap()
        .unwrap();
    // {"text": "hi"} in MessagePack, the client's default codec.
    assert_eq!(
        &msg.payload[..],
        &[0x81, 0xa4, b't', b'e', b'x', b't', 0xa2, b'h', b'i']
    );
    let headers = msg.headers.unwrap();
    assert_eq!(
        headers.get(messages::headers::CODEC).unwrap().as_str(),
        "msgpack"
    );
    assert_eq!(
        headers.get(messages::headers::SOCKET_ID).unwrap().as_str(),
        socket_id
    );

    // Rooms: a join the token allows is acked, one it does not is refused with 403.
    assert_eq!(
        call(&browser, "alice", "join", json!(["chat.lobby"])).await,
        "ok"
    );
    let refused = call(&browser, "alice", "join", json!(["staff.only"])).await;
    assert_eq!(refused["code"], 403, "{refused}");
    assert_eq!(refused["name"], "forbidden");
    push(
        api.addr(),
        json!({"target": {"room": "chat.lobby"}, "route": "room.msg", "body": {"room": "hi"}}),
    )
    .await;
    let got = pushes(&browser, "alice", 2).await;
    assert_eq!(got[1]["route"], "room.msg");
    assert_eq!(got[1]["body"], json!({"room": "hi"}));

    // A compressed push (raw DEFLATE, JSON), published on the bus the way a service does:
    // the browser inflates it with DecompressionStream.
    let big = "x".repeat(3000);
    let body = serde_json::to_vec(&json!({"big": big})).unwrap();
    let envelope = PushEnvelope {
        compressed: true,
        ..PushEnvelope::new(77, Route::new("zipped").unwrap(), BodyCodec::Json)
    };
    bus.publish_with_headers(
        "ws.user.alice",
        envelope.to_headers(),
        messages::compress::deflate(&body).into(),
    )
    .await
    .unwrap();
    bus.flush().await.unwrap();
    let got = pushes(&browser, "alice", 3).await;
    assert_eq!(
        (&got[2]["route"], &got[2]["id"], &got[2]["body"]["big"]),
        (&json!("zipped"), &json!("77"), &json!(big))
    );

    // The JSON codec: control bodies in JSON, the socket id as a string.
    let bob = token("bob", None, &[]);
    let welcome = browser
        .execute_async(start, json!(["bob", ws_url, bob, "json"]))
        .await
        .unwrap();
    assert_eq!(welcome["userId"], "bob", "{welcome}");
    assert_eq!(
        call(&browser, "bob", "publish", json!(["chat.send", [1, 2]])).await,
        "ok"
    );
    assert_eq!(
        call(&browser, "bob", "join", json!(["public.hall"])).await,
        "ok"
    );

    // Heartbeats: the interval grew with the acks (only the gateway computes it), and the
    // session was never closed for missing them (4001).
    browser
        .wait_for("window.clients.alice.client.interval >= 1200", WAIT)
        .await
        .unwrap();
    assert_eq!(welcome_heartbeat(&browser).await, json!(800));
    assert!(
        events_of(&browser, "alice", "disconnected")
            .await
            .is_empty()
    );

    if let Ok(png) = browser.screenshot().await {
        let dir = testkit::workspace_root().join("target/browser-artifacts");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("js_client.png"), png);
    }

    // A drain: reconnect frame, close 4000, reconnect with backoff to the replacement on the
    // same port, the room joined again, and room pushes flowing again.
    gw.shutdown().await.unwrap();
    browser
        .wait_for(
            "window.clients.alice.events.some(e => e.type === 'disconnected' && e.detail.code === 4000)",
            WAIT,
        )
        .await
        .unwrap();
    assert!(!events_of(&browser, "alice", "reconnect").await.is_empty());
    let listener = TcpListener::bind(gw_addr).unwrap();
    let gw = testkit::gateway::start_on(gw_config(), listener).await;
    browser
        .wait_for(
            "window.clients.alice.events.filter(e => e.type === 'connected').length >= 2",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let second = events_of(&browser, "alice", "connected").await;
    assert_ne!(second[1]["detail"]["socketId"], json!(socket_id));
    assert!(events_of(&browser, "alice", "closed").await.is_empty());
    // The rejoin is acked asynchronously after the welcome: push until one arrives.
    let before = pushes(&browser, "alice", 3).await.len();
    let mut arrived = false;
    for n in 0..40 {
        push(
            api.addr(),
            json!({"target": {"room": "chat.lobby"}, "route": "room.again", "body": n}),
        )
        .await;
        let expr = format!("window.clients.alice.pushes.length > {before}");
        if browser
            .wait_for(&expr, Duration::from_millis(250))
            .await
            .is_ok()
        {
            arrived = true;
            break;
        }
    }
    assert!(
        arrived,
        "no room push after the reconnect: the rejoin did not happen"
    );

    // Leave: acked, and the room's pushes stop. A user push sent after the room push comes
    // through the same bus connections in order, so its arrival proves the room push was
    // not merely slow.
    assert_eq!(
        call(&browser, "alice", "leave", json!(["chat.lobby"])).await,
        "ok"
    );
    let before = pushes(&browser, "alice", 1).await.len();
    push(
        api.addr(),
        json!({"target": {"room": "chat.lobby"}, "route": "room.after", "body": "gone"}),
    )
    .await;
    push(
        api.addr(),
        json!({"target": {"users": ["alice"]}, "route": "marker", "body": "marker"}),
    )
    .await;
    let got = pushes(&browser, "alice", before + 1).await;
    let routes: Vec<&Value> = got[before..].iter().map(|p| &p["route"]).collect();
    assert!(routes.contains(&&json!("marker")), "{got:?}");
    assert!(!routes.contains(&&json!("room.after")), "{got:?}");

    // A terminal close code (a service kicks bob with 4503): the client stops for good,
    // says why, and makes no further attempt.
    browser
        .wait_for(
            "window.clients.bob.events.filter(e => e.type === 'connected').length >= 2",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let bob_socket: u64 = events_of(&browser, "bob", "connected").await[1]["detail"]["socketId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let kick = GatewayControl::Close {
        socket_id: SocketId(bob_socket),
        code: 4503,
        reason: "kicked by the test".into(),
    };
    bus.publish(
        "ws.gw.gw-browser.ctl",
        encode_body(BodyCodec::MsgPack, &kick).unwrap().into(),
    )
    .await
    .unwrap();
    let closed = browser
        .wait_for(
            "window.clients.bob.events.find(e => e.type === 'closed')",
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(
        closed["detail"],
        json!({"code": 4503, "reason": "kicked by the test", "codeName": "kicked"})
    );
    let attempts = events_of(&browser, "bob", "connecting").await.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        events_of(&browser, "bob", "connecting").await.len(),
        attempts
    );
    assert_eq!(
        browser
            .execute("return window.clients.alice.client.state", json!([]))
            .await
            .unwrap(),
        "connected"
    );

    // Nothing the gateway sent failed to decode, in either codec, and no error frame came
    // that was not the answer to a request.
    for client in ["alice", "bob"] {
        assert_eq!(
            events_of(&browser, client, "error").await,
            Vec::<Value>::new()
        );
    }

    browser.quit().await;
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}
