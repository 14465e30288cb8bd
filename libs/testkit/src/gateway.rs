//! One ws-gateway fixture for every crate's tests, so a change to the gateway's
//! configuration is made once: [`config`] is a replica with the test keys (the test HS256
//! secret for app tokens, the test agent-token key for agents), one worker, a 5 s lease,
//! a 100 ms drain window and a 300 ms presence sync; [`start`] runs one in-process on a
//! free loopback port and returns once `/readyz` says ready.
//!
//! Tests that need something else change the returned [`ws_gateway::Config`] before
//! starting it. The gateway's own tests keep their fixture in `tests/common`.

use std::net::TcpListener;
use std::time::Duration;

use messages::GatewayId;

/// A test replica named `instance` on the bus at `nats_url`.
pub fn config(nats_url: &str, instance: &str) -> ws_gateway::Config {
    let keys = ws_gateway::auth::Keys::new(Some(crate::ws::TEST_SECRET.as_bytes()), None, 0)
        .and_then(|k| k.with_agent_keys(crate::ws::TEST_AGENT_TOKEN_PUBLIC.as_bytes()))
        .unwrap_or_else(|e| panic!("test gateway keys: {e}"));
    let instance =
        GatewayId::new(instance).unwrap_or_else(|e| panic!("gateway name {instance:?}: {e}"));
    let mut config = ws_gateway::Config::new(nats_url, instance, keys);
    config.workers = 1;
    config.lease_ttl = Duration::from_secs(5);
    config.drain_window = Duration::from_millis(100);
    config.presence_sync = Duration::from_millis(300);
    config.stats_interval = Some(Duration::from_millis(300));
    config
}

/// Starts `config` on a free loopback port and waits until it is ready.
pub async fn start(config: ws_gateway::Config) -> ws_gateway::Handle {
    let listener =
        TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("binding a port: {e}"));
    start_on(config, listener).await
}

/// Starts `config` on `listener` (a port a test wants to reuse) and waits until ready.
pub async fn start_on(config: ws_gateway::Config, listener: TcpListener) -> ws_gateway::Handle {
    let handle = ws_gateway::spawn(config, listener)
        .unwrap_or_else(|e| panic!("starting the test gateway: {e}"));
    crate::http::wait_status(handle.addr(), "/readyz", 200).await;
    handle
}
