//! A minimal HTTP/1.1 client for tests (one request per connection, `Connection: close`),
//! so service tests can call real HTTP APIs without pulling in a full client.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends one request and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(raw.len());
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw.get(split + 4..).unwrap_or_default().to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok(Response { status, body })
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

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = data.get(end + 2..).unwrap_or_default();
    }
    out
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
