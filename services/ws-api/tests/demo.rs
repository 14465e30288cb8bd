//! The demo page (`/demo/`, served by ws-api with the client library's files) in a real
//! headless Chromium against a real nats-server, gateway and ws-api: it loads the library,
//! gets a development token, connects, receives a push from ws-api, publishes and gets
//! the ack, joins the room and sees the relayed chat line. Then, with WebSocket blocked by
//! a proxy in front of the gateway (it refuses any request asking for an upgrade, as a
//! proxy that strips `Upgrade` would make it fail), the same page works over HTTP
//! long-polling, and moves to WebSocket when the proxy lets it through again.
//!
//! Chromium missing on a developer machine skips the browser test with a message; `.ci/run`
//! installs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use testkit::NatsServer;
use testkit::browser::Browser;
use testkit::http;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "test-api-key-0123456789";
const WAIT: Duration = Duration::from_secs(20);

async fn api(nats: &str, demo_secret: Option<&str>, gateway_url: &str) -> ws_api::Handle {
    let mut config = ws_api::Config::new(nats, vec![KEY.to_owned()]);
    config.demo_token_secret = demo_secret.map(str::to_owned);
    config.demo_gateway_url = gateway_url.to_owned();
    let handle = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(handle.addr(), "/readyz", 200).await;
    handle
}

/// A TCP proxy to the gateway that, while `block` is set, answers any request asking for
/// a WebSocket upgrade with 403 and passes everything else through.
struct Proxy {
    addr: SocketAddr,
    block: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let block = Arc::new(AtomicBool::new(false));
        let blocking = Arc::clone(&block);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let blocking = Arc::clone(&blocking);
                tokio::spawn(async move {
                    // The first request's head decides (a browser opens a connection of its
                    // own for each WebSocket).
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let lower = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if blocking.load(Ordering::SeqCst) && lower.contains("upgrade: websocket") {
                        let _ = client
                            .write_all(
                                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Proxy { addr, block }
    }
}

async fn push(api: SocketAddr, body: Value) {
    let r = http::post_json(api, "/v1/push", KEY, &body).await.unwrap();
    assert_eq!(r.status, 202, "{:?}", r.json());
}

async fn wait(browser: &Browser, expr: &str) -> Value {
    match browser.wait_for(expr, WAIT).await {
        Ok(v) => v,
        Err(e) => {
            let state = browser
                .execute(
                    "return JSON.stringify({state: demo.state, transport: demo.transport, errors: demo.errors, log: document.getElementById('messages').innerText})",
                    json!([]),
                )
                .await;
            panic!("{e}; page: {state:?}");
        }
    }
}

async fn say(browser: &Browser, text: &str) {
    browser
        .execute(
            "document.getElementById('text').value = arguments[0];
             document.getElementById('say').requestSubmit();",
            json!([text]),
        )
        .await
        .unwrap();
}

/// Connects the page as `user`, then: a push from ws-api, a chat line acked and relayed to
/// the room. Returns the transport the page ended up on.
async fn chat_round(browser: &Browser, api: SocketAddr, user: &str, n: u64) {
    push(
        api,
        json!({"target": {"users": [user]}, "route": "hello", "body": {"n": n}}),
    )
    .await;
    wait(
        browser,
        &format!("demo.pushes.some(p => p.route === 'hello' && p.body.n === {n})"),
    )
    .await;
    let acks = browser
        .execute("return demo.acks", json!([]))
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    let text = format!("line {n} from {user}");
    say(browser, &text).await;
    wait(browser, &format!("demo.acks > {acks}")).await;
    wait(
        browser,
        &format!("demo.messages.some(m => m.user === '{user}' && m.text === '{text}')"),
    )
    .await;
}

#[tokio::test]
async fn the_demo_page_chats_over_websocket_then_long_polling_then_upgrades() {
    let Some(browser) = Browser::start().await.unwrap() else {
        eprintln!(
            "SKIPPED: chromium or chromedriver is not installed \
             (apt-get install chromium chromium-driver; .ci/run does)"
        );
        return;
    };
    let nats = NatsServer::start().unwrap();
    let gw = testkit::gateway::start(testkit::gateway::config(&nats.url(), "gw-demo")).await;
    let proxy = Proxy::start(gw.addr()).await;
    let gateway_url = format!("ws://{}/ws", proxy.addr);
    let api = api(&nats.url(), Some(testkit::ws::TEST_SECRET), &gateway_url).await;
    let site = format!("http://{}/demo/", api.addr());

    // Over WebSocket.
    browser.goto(&format!("{site}?user=dana")).await.unwrap();
    wait(
        &browser,
        "window.demo && demo.state === 'connected' && demo.joined",
    )
    .await;
    assert_eq!(
        browser
            .execute("return demo.transport", json!([]))
            .await
            .unwrap(),
        "websocket"
    );
    chat_round(&browser, api.addr(), "dana", 1).await;

    // WebSocket blocked: the same page falls back to long-polling.
    proxy.block.store(true, Ordering::SeqCst);
    browser
        .goto(&format!(
            "{site}?user=erin&upgradeDelayMs=500&wsTimeoutMs=3000"
        ))
        .await
        .unwrap();
    wait(
        &browser,
        "window.demo && demo.state === 'connected' && demo.joined",
    )
    .await;
    assert_eq!(
        browser
            .execute("return demo.transport", json!([]))
            .await
            .unwrap(),
        "longpoll"
    );
    chat_round(&browser, api.addr(), "erin", 2).await;
    // Still polling while WebSocket stays blocked (each upgrade attempt was refused).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        browser
            .execute("return demo.transport", json!([]))
            .await
            .unwrap(),
        "longpoll"
    );

    // WebSocket back: the session moves over, same socket, and keeps working.
    proxy.block.store(false, Ordering::SeqCst);
    wait(&browser, "demo.client.transport === 'websocket'").await;
    chat_round(&browser, api.addr(), "erin", 3).await;
    let connected = browser
        .execute(
            "return demo.client.welcome && demo.state === 'connected'",
            json!([]),
        )
        .await
        .unwrap();
    assert_eq!(connected, true);
    let metrics = http::request(gw.addr(), "GET", "/metrics", &[], b"")
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ws_gateway_longpoll_upgraded_total") && l.ends_with(" 1")),
        "one session moved to WebSocket:\n{metrics}"
    );
    assert_eq!(
        browser
            .execute("return demo.errors", json!([]))
            .await
            .unwrap(),
        json!([])
    );
    // What a person sees says so too.
    wait(
        &browser,
        "document.getElementById('status').textContent === 'connected (websocket)'",
    )
    .await;
    if let Ok(png) = browser.screenshot().await {
        let dir = testkit::workspace_root().join("target/browser-artifacts");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("demo.png"), png);
    }
    browser.quit().await;
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn development_tokens_exist_only_when_enabled() {
    let nats = NatsServer::start().unwrap();
    let off = api(&nats.url(), None, "").await;
    let r = http::request(off.addr(), "POST", "/demo/token", &[], br#"{"user":"x"}"#)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("not_found"))
    );
    // The page and the library are served either way.
    let r = http::request(off.addr(), "GET", "/demo/", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = http::request(off.addr(), "GET", "/demo/lib/transport.js", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = http::request(off.addr(), "GET", "/demo/lib/../lib.rs", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let config = http::request(off.addr(), "GET", "/demo/config.json", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(config["devTokens"], false);
    off.shutdown().await.unwrap();

    let on = api(&nats.url(), Some(testkit::ws::TEST_SECRET), "ws://gw/ws").await;
    let r = http::request(on.addr(), "POST", "/demo/token", &[], br#"{"user":"a b"}"#)
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("bad_user"))
    );
    let r = http::request(on.addr(), "POST", "/demo/token", &[], br#"{"user":"zoe"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let token = r.json()["token"].as_str().unwrap().to_owned();
    let keys =
        ws_gateway::auth::Keys::new(Some(testkit::ws::TEST_SECRET.as_bytes()), None, 0).unwrap();
    let identity = ws_gateway::auth::verify(&token, &keys).unwrap();
    assert_eq!(identity.user_id.as_str(), "zoe");
    assert_eq!(
        identity
            .allowed_rooms
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>(),
        vec![ws_api::demo::ROOM]
    );
    on.shutdown().await.unwrap();
}
