//! The services' JSON APIs (ws-api pushes, scheduler tasks) as the load generator calls
//! them: bearer auth, JSON in and out, a deadline per call, over the workspace's one HTTP
//! client (`servicekit::http_client`). Enough for a few requests per second; the load is
//! on the WebSocket side.

use std::net::SocketAddr;
use std::time::Duration;

/// An HTTP call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// The client could not be set up.
    #[error("http {0}: {1}")]
    Client(String, #[source] servicekit::http_client::ClientError),
    /// Connect, write or read failed, or the answer was not HTTP.
    #[error("http {0}: {1}")]
    Request(String, #[source] reqwest::Error),
    /// No answer in time.
    #[error("http {0}: timed out")]
    Timeout(String),
}

pub(crate) use servicekit::http_client::Response;

/// Sends one request and reads the whole response.
pub(crate) async fn request(
    addr: SocketAddr,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let what = format!("{method} {path}");
    let client = servicekit::http_client::client(servicekit::http_client::ClientOptions {
        timeout: Some(timeout),
        ..Default::default()
    })
    .map_err(|e| HttpError::Client(what.clone(), e))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let fail = |e: reqwest::Error| {
        if e.is_timeout() {
            HttpError::Timeout(what.clone())
        } else {
            HttpError::Request(what.clone(), e)
        }
    };
    let request = client
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    servicekit::http_client::fetch(request).await.map_err(fail)
}
