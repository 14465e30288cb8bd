//! Shared set-up for gateway integration tests: a real nats-server, real gateway replicas
//! on port 0, and helpers to publish pushes and control messages the way services do.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use futures_util::StreamExt;
use messages::envelope::PushEnvelope;
use messages::payload::{self, GatewayControl};
use messages::{BodyCodec, GatewayId, Route};
use testkit::ws::TEST_SECRET;
use ws_gateway::Config;
use ws_gateway::auth::Keys;

/// A gateway config for tests: one worker, the test secret, a short lease TTL.
pub(crate) fn config(nats_url: &str, instance: &str) -> Config {
    let keys = Keys::new(Some(TEST_SECRET.as_bytes()), None, 0)
        .and_then(|k| k.with_agent_keys(testkit::ws::TEST_AGENT_TOKEN_PUBLIC.as_bytes()))
        .unwrap();
    let mut config = Config::new(nats_url, GatewayId::new(instance).unwrap(), keys);
    config.workers = 1;
    config.lease_ttl = Duration::from_secs(5);
    config.drain_window = Duration::from_millis(200);
    config.shutdown_deadline = Duration::from_secs(10);
    config
}

/// Starts a replica on a free port and waits until `/readyz` says ready.
pub(crate) async fn start(config: Config) -> ws_gateway::Handle {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let handle = ws_gateway::spawn(config, listener).unwrap();
    wait_ready(handle.addr(), true).await;
    handle
}

/// Plain HTTP GET against the replica; returns status and body.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = testkit::http::request(addr, "GET", path, &[], b"")
        .await
        .unwrap();
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// Waits until `/readyz` reports `ready` (or not).
pub(crate) async fn wait_ready(addr: SocketAddr, ready: bool) {
    testkit::http::wait_status(addr, "/readyz", if ready { 200 } else { 503 }).await;
}

/// The value of one metric line (first match) from `/metrics`.
pub(crate) async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A NATS client for the test's "service" side.
pub(crate) async fn bus_client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap()
}

/// The push tests send unless they say otherwise: this id, route `test.push`, raw body.
pub(crate) fn test_push(msg_id: u64) -> PushEnvelope {
    PushEnvelope::new(msg_id, Route::new("test.push").unwrap(), BodyCodec::Raw)
}

/// Publishes [`test_push`] on `subject`.
pub(crate) async fn push(client: &async_nats::Client, subject: &str, msg_id: u64, body: &[u8]) {
    push_envelope(client, subject, &test_push(msg_id), body).await;
}

/// Publishes a push with the given envelope on `subject`.
pub(crate) async fn push_envelope(
    client: &async_nats::Client,
    subject: &str,
    envelope: &PushEnvelope,
    body: &[u8],
) {
    client
        .publish_with_headers(
            subject.to_owned(),
            envelope.to_headers(),
            body.to_vec().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
}

/// Sends a control message to one gateway.
pub(crate) async fn control(client: &async_nats::Client, gateway: &str, ctl: &GatewayControl) {
    let subject = messages::subject::gateway_control(&GatewayId::new(gateway).unwrap());
    client
        .publish(subject, payload::to_bus(ctl).unwrap().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
}

/// Next message on a subscription, within 10 s.
pub(crate) async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("bus message in time")
        .expect("open")
}
