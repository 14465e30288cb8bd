#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The NATS setting as operators write it: credentials in the URL and a list of servers
//! (the first one down), against a real nats-server that requires the per-service users of
//! `nats/auth.conf`; and a bad setting is an error, not a crash.

use std::net::TcpListener;
use std::time::Duration;

use messages::GatewayId;
use testkit::ws::{TEST_SECRET, TestClient, token};
use testkit::{NatsServer, http, workspace_root};

fn config(nats: &str) -> ws_gateway::Config {
    let keys = ws_gateway::auth::Keys::new(Some(TEST_SECRET.as_bytes()), None, 0)
        .and_then(|k| k.with_agent_keys(testkit::ws::TEST_AGENT_TOKEN_PUBLIC.as_bytes()))
        .unwrap();
    let mut config = ws_gateway::Config::new(nats, GatewayId::new("gw-auth").unwrap(), keys);
    config.workers = 1;
    config.lease_ttl = Duration::from_secs(5);
    config.drain_window = Duration::from_millis(100);
    config
}

#[tokio::test]
async fn credentials_in_the_url_and_a_server_list_with_a_dead_first_entry() {
    let nats = NatsServer::start_with_config(
        workspace_root().join("nats/single-auth.conf"),
        &[
            ("RT_NATS_GATEWAY_PASSWORD", "gw-s3cret"),
            ("RT_NATS_API_PASSWORD", "x"),
            ("RT_NATS_SCHEDULER_PASSWORD", "x"),
            ("RT_NATS_LOADTEST_PASSWORD", "x"),
            ("RT_NATS_DEV_PASSWORD", "x"),
        ],
    )
    .unwrap();
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "nats://ws-gateway:gw-s3cret@127.0.0.1:{dead}, nats://ws-gateway:gw-s3cret@127.0.0.1:{port}"
    );
    let gw = ws_gateway::spawn(config(&url), TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    // Ready means connected, authorised and holding its worker-id lease in its KV bucket.
    http::wait_status(gw.addr(), "/readyz", 200).await;
    // Under these permissions a session is confirmed (the gateway may publish its own
    // subscription probe) and a push from ws-api's credential reaches it.
    let mut client = TestClient::connect(gw.addr(), &token("ada", None, &[]))
        .await
        .expect("welcomed under the gateway's NATS permissions");
    let api = async_nats::ConnectOptions::with_user_and_password("ws-api".into(), "x".into())
        .connect(nats.url())
        .await
        .unwrap();
    let push = messages::envelope::PushEnvelope::new(
        7,
        messages::Route::empty(),
        messages::BodyCodec::Raw,
    );
    api.publish_with_headers("ws.user.ada", push.to_headers(), "hi".into())
        .await
        .unwrap();
    api.flush().await.unwrap();
    assert_eq!(client.frame().await.msg_id, 7);
    gw.shutdown().await.unwrap();

    // A wrong password never gets ready (and does not crash).
    let bad = format!("nats://ws-gateway:wrong@127.0.0.1:{port}");
    let gw = ws_gateway::spawn(config(&bad), TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http::request(gw.addr(), "GET", "/readyz", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    let _ = gw.shutdown().await;
}

#[tokio::test]
async fn without_permission_for_its_probe_a_gateway_is_not_ready_and_says_why() {
    // auth.conf as it was before the probe subject existed.
    let dir = tempfile::tempdir().unwrap();
    let auth = std::fs::read_to_string(workspace_root().join("nats/auth.conf"))
        .unwrap()
        .replace("\"ws.gw.*.probe\",", "");
    assert!(
        !auth.contains("probe\""),
        "the probe permission was removed"
    );
    std::fs::write(dir.path().join("auth.conf"), auth).unwrap();
    std::fs::copy(
        workspace_root().join("nats/single.conf"),
        dir.path().join("single.conf"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("server.conf"),
        "include ./single.conf\ninclude ./auth.conf\n",
    )
    .unwrap();
    let nats = NatsServer::start_with_config(
        dir.path().join("server.conf"),
        &[
            ("RT_NATS_GATEWAY_PASSWORD", "gw"),
            ("RT_NATS_API_PASSWORD", "x"),
            ("RT_NATS_SCHEDULER_PASSWORD", "x"),
            ("RT_NATS_LOADTEST_PASSWORD", "x"),
            ("RT_NATS_DEV_PASSWORD", "x"),
        ],
    )
    .unwrap();
    let port = nats.url().rsplit(':').next().unwrap().to_owned();
    let url = format!("nats://ws-gateway:gw@127.0.0.1:{port}");
    let gw = ws_gateway::spawn(config(&url), TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    // Connected and leased, but it cannot confirm sessions: not ready, refusing upgrades
    // up front (503) rather than closing every client after the welcome wait.
    let body = http::eventually(gw.addr(), "/readyz", "", |v| {
        v["nats_connected"] == true && v["worker_id"].is_u64()
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("subscription probe unanswered")),
        "{body}"
    );
    let refused = TestClient::connect(gw.addr(), &token("ada", None, &[])).await;
    assert!(
        matches!(refused, Err(testkit::ws::ConnectError::Status(503))),
        "{refused:?}"
    );
    let _ = gw.shutdown().await;
}

#[tokio::test]
async fn an_unusable_nats_setting_is_an_error_not_a_panic() {
    for setting in ["http://127.0.0.1:4222", " , "] {
        let gw =
            ws_gateway::spawn(config(setting), TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        let err = gw.shutdown().await.expect_err(setting);
        assert!(err.to_string().contains("NATS"), "{setting}: {err}");
    }
}
