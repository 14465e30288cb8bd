//! HTTP helpers for tests: one-call requests to the services' real HTTP APIs (bearer keys,
//! JSON bodies) and polling until an endpoint reaches a state, over the workspace's one
//! HTTP client (`servicekit::http_client`).

use std::net::SocketAddr;

pub use servicekit::http_client::Response;

/// Bound on one test request.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one request and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
    // A client per request: tests each run their own runtime, and a pooled connection
    // must not outlive the runtime that opened it.
    // Bounded: a server that accepts and never answers fails the request (and the polls
    // built on it retry) instead of hanging the test until the runner kills it.
    let client = servicekit::http_client::client(servicekit::http_client::ClientOptions {
        timeout: Some(REQUEST_TIMEOUT),
        ..Default::default()
    })
    .map_err(std::io::Error::other)?;
    let mut req = client
        .request(method, format!("http://{addr}{path}"))
        .body(body.to_vec());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    servicekit::http_client::fetch(req)
        .await
        .map_err(std::io::Error::other)
}

/// POSTs JSON with a bearer token.
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    key: &str,
    json: &serde_json::Value,
) -> std::io::Result<Response> {
    request_json(addr, "POST", path, key, json).await
}

/// GETs with a bearer token.
pub async fn get(addr: SocketAddr, path: &str, key: &str) -> std::io::Result<Response> {
    let auth = format!("Bearer {key}");
    request(addr, "GET", path, &[("authorization", &auth)], b"").await
}

/// Sends JSON with `method` (PUT, PATCH, ...) and a bearer token.
pub async fn request_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    json: &serde_json::Value,
) -> std::io::Result<Response> {
    let auth = format!("Bearer {key}");
    let body = serde_json::to_vec(json).unwrap_or_default();
    request(
        addr,
        method,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &body,
    )
    .await
}

/// DELETEs with a bearer token.
pub async fn delete(addr: SocketAddr, path: &str, key: &str) -> std::io::Result<Response> {
    let auth = format!("Bearer {key}");
    request(addr, "DELETE", path, &[("authorization", &auth)], b"").await
}

/// How long the polling helpers below wait before failing the test.
pub const POLL_FOR: std::time::Duration = std::time::Duration::from_secs(20);
const POLL_EVERY: std::time::Duration = std::time::Duration::from_millis(25);

/// Polls `GET path` (no credentials) until it answers `want`; returns that response.
/// Fails the test after [`POLL_FOR`].
pub async fn wait_status(addr: SocketAddr, path: &str, want: u16) -> Response {
    let give_up = tokio::time::Instant::now() + POLL_FOR;
    loop {
        if let Ok(r) = request(addr, "GET", path, &[], b"").await
            && r.status == want
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{addr}{path} never answered {want}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `GET path` with a bearer `key` until `check` accepts the JSON; returns it. Fails the
/// test after [`POLL_FOR`], showing the last answer.
pub async fn eventually(
    addr: SocketAddr,
    path: &str,
    key: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let give_up = tokio::time::Instant::now() + POLL_FOR;
    loop {
        let v = get(addr, path, key)
            .await
            .map(|r| r.json())
            .unwrap_or(serde_json::Value::Null);
        if check(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{path} never reached the expected state; last: {v}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `ws://host:port/ws`, `http://host:port` or `host:port` to an IPv4 socket address.
pub async fn resolve(url: &str) -> std::io::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or(rest);
    tokio::net::lookup_host(hostport)
        .await?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| std::io::Error::other(format!("{url}: no IPv4 address")))
}
