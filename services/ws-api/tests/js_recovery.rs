//! Recovery in a real browser (ADR 0017): the JavaScript client (`clients/js`,
//! `recovery: true`) in headless Chromium over WebDriver, against a real nats-server with
//! JetStream, a gateway and ws-api keeping history for `chat.` rooms. The gateway goes away
//! while 100 pushes go to the client's room (some while it is down, the rest while the
//! client reconnects and its replay runs): afterwards the page has all 100, in order, once,
//! and a `recovered: true` event. A second outage longer than the replay window gets
//! `recovered: false`.
//!
//! Chromium missing on a developer machine skips the test with a message; `.ci/run`
//! installs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use testkit::NatsServer;
use testkit::browser::{Browser, StaticServer};
use testkit::http;
use testkit::ws::token;

const KEY: &str = "test-api-key-0123456789";
const WAIT: Duration = Duration::from_secs(30);
const MAX_REPLAY: u64 = 150;

async fn push(api: SocketAddr, n: u64) {
    let r = http::post_json(
        api,
        "/v1/push",
        KEY,
        &json!({"target": {"room": "chat.lobby"}, "route": "msg", "body": {"n": n}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.json());
}

async fn record(browser: &Browser, what: &str) -> Vec<Value> {
    browser
        .execute(&format!("return window.record.{what}"), json!([]))
        .await
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn wait_or_explain(browser: &Browser, expr: &str) {
    if let Err(e) = browser.wait_for(expr, WAIT).await {
        let events = record(browser, "events").await;
        let n = record(browser, "pushes").await.len();
        panic!("{e}; {n} pushes; events: {events:?}");
    }
}

#[tokio::test]
async fn a_browser_recovers_the_pushes_it_missed_while_disconnected() {
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
    let gw_config = || {
        let mut config = testkit::gateway::config(&nats.url(), "gw-recovery");
        config.max_replay = MAX_REPLAY;
        config
    };
    let gw = testkit::gateway::start_on(gw_config(), listener).await;
    let mut config = ws_api::Config::new(nats.url(), vec![KEY.to_owned()]);
    config.history.room_prefixes = vec!["chat.".into()];
    let api = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(api.addr(), "/readyz", 200).await;
    let site = StaticServer::start(testkit::workspace_root().join("clients/js"))
        .await
        .unwrap();

    browser
        .goto(&format!("{}/test/recovery.html", site.url()))
        .await
        .unwrap();
    browser
        .wait_for("window.pageReady === true", WAIT)
        .await
        .unwrap();
    let welcome = browser
        .execute_async(
            "const [url, token, done] = arguments;
             window.start(url, token).then(done, e => done({error: String(e)}));",
            json!([
                format!("ws://{gw_addr}/ws"),
                token("alice", None, &["chat.lobby"])
            ]),
        )
        .await
        .unwrap();
    assert_eq!(welcome["userId"], "alice", "{welcome}");
    let joined = browser
        .execute_async(
            "const [room, done] = arguments; window.join(room).then(done);",
            json!(["chat.lobby"]),
        )
        .await
        .unwrap();
    assert_eq!(joined["recovered"], false, "a first join: {joined}");
    // One push before the outage gives the page its position in the room.
    push(api.addr(), 0).await;
    wait_or_explain(&browser, "window.record.pushes.length >= 1").await;

    // Outage 1: the gateway goes; 100 pushes go to the room, the first 30 while nothing
    // listens, the rest while the gateway comes back and the page reconnects and recovers.
    gw.shutdown().await.unwrap();
    wait_or_explain(
        &browser,
        "window.record.events.some(e => e.type === 'disconnected')",
    )
    .await;
    let sent = Arc::new(AtomicU64::new(0));
    let pushing = tokio::spawn({
        let sent = Arc::clone(&sent);
        let api = api.addr();
        async move {
            for n in 1..=100 {
                push(api, n).await;
                sent.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    while sent.load(Ordering::SeqCst) < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gw = testkit::gateway::start_on(gw_config(), TcpListener::bind(gw_addr).unwrap()).await;
    pushing.await.unwrap();
    wait_or_explain(&browser, "window.record.pushes.length >= 101").await;
    // Nothing more is on its way: a duplicate would show up within this pause.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pushes = record(&browser, "pushes").await;
    let ns: Vec<u64> = pushes
        .iter()
        .map(|p| p["body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (0..=100).collect::<Vec<u64>>(), "all, in order, once");
    let offsets: Vec<u64> = pushes
        .iter()
        .map(|p| p["position"]["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (1..=101).collect::<Vec<u64>>());
    let recovered: Vec<Value> = record(&browser, "events")
        .await
        .into_iter()
        .filter(|e| e["type"] == "recovered")
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(recovered[0]["detail"]["room"], "chat.lobby");
    assert_eq!(recovered[0]["detail"]["recovered"], true, "{recovered:?}");

    if let Ok(png) = browser.screenshot().await {
        let dir = testkit::workspace_root().join("target/browser-artifacts");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("js_recovery.png"), png);
    }

    // Outage 2: more pushes than the replay window. The page is told it did not recover
    // (so the application reloads) and the live stream continues after it.
    gw.shutdown().await.unwrap();
    wait_or_explain(
        &browser,
        "window.record.events.filter(e => e.type === 'disconnected').length >= 2",
    )
    .await;
    for n in 101..=(101 + MAX_REPLAY) {
        push(api.addr(), n).await;
    }
    let gw = testkit::gateway::start_on(gw_config(), TcpListener::bind(gw_addr).unwrap()).await;
    wait_or_explain(
        &browser,
        "window.record.events.filter(e => e.type === 'recovered').length >= 2",
    )
    .await;
    let recovered: Vec<Value> = record(&browser, "events")
        .await
        .into_iter()
        .filter(|e| e["type"] == "recovered")
        .collect();
    assert_eq!(recovered[1]["detail"]["recovered"], false, "{recovered:?}");
    assert_eq!(
        record(&browser, "pushes").await.len(),
        101,
        "nothing replayed"
    );
    push(api.addr(), 9999).await;
    wait_or_explain(&browser, "window.record.pushes.length >= 102").await;
    let last = record(&browser, "pushes").await.pop().unwrap();
    assert_eq!(last["body"]["n"], 9999);
    assert_eq!(last["position"]["offset"], 102 + MAX_REPLAY + 1);
    assert!(
        record(&browser, "events")
            .await
            .iter()
            .all(|e| e["type"] != "error" && e["type"] != "closed"),
        "{:?}",
        record(&browser, "events").await
    );

    browser.quit().await;
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}
