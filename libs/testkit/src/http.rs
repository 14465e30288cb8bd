//! HTTP helpers for tests: one-call requests to the services' real HTTP APIs (bearer keys,
//! JSON bodies) and polling until an endpoint reaches a state, over the workspace's one
//! HTTP client (`servicekit::http_client`).

use std::net::SocketAddr;

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Response headers, names lower-case, in order (repeated names repeat).
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// The first value of header `name` (lower-case), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends one request and reads the whole response.
/// Bound on one test request.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
    let resp = req.send().await.map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.bytes().await.map_err(std::io::Error::other)?.to_vec();
    Ok(Response {
        status,
        body,
        headers,
    })
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
