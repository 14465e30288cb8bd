//! The workspace's one HTTP client: reqwest over rustls with the ring provider, set up from
//! [`crate::tls`] so every caller (schedctl, the load generator, test helpers) trusts and
//! pins the same way and none pulls in a second TLS stack. Redirects are not followed: the
//! APIs called here never redirect, and a 3xx is reported as such rather than carrying a
//! request (and its key) somewhere else.

use std::time::Duration;

use crate::tls::{self, RootCertStore, SpkiPin, TlsError};

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TLS configuration is unusable.
    #[error("TLS set-up: {0}")]
    Tls(#[from] TlsError),
    /// reqwest refused the configuration.
    #[error("HTTP client set-up: {0}")]
    Build(#[source] reqwest::Error),
}

/// Trust and limits of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// CAs trusted for `https://` (empty: plain HTTP only).
    pub roots: RootCertStore,
    /// With pins, the server's key must also match one of them.
    pub pins: Vec<SpkiPin>,
    /// Bound on a whole request (connect to last body byte); `None` for no bound.
    pub timeout: Option<Duration>,
}

impl Default for ClientOptions {
    /// Plain HTTP (no trusted CAs), no timeout.
    fn default() -> Self {
        ClientOptions {
            roots: RootCertStore::empty(),
            pins: Vec::new(),
            timeout: None,
        }
    }
}

/// An async client.
pub fn client(options: ClientOptions) -> Result<reqwest::Client, ClientError> {
    let config = tls::client_config(options.roots, &options.pins)?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none());
    if let Some(timeout) = options.timeout {
        builder = builder.timeout(timeout);
    }
    builder.build().map_err(ClientError::Build)
}

/// A whole response: its status and body, for callers that read small JSON answers.
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

/// Sends `request` and reads the whole response body.
pub async fn fetch(request: reqwest::RequestBuilder) -> Result<Response, reqwest::Error> {
    let resp = request.send().await?;
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
    let body = resp.bytes().await?.to_vec();
    Ok(Response {
        status,
        body,
        headers,
    })
}

/// A blocking client (command-line tools); do not call it from async code.
pub fn blocking_client(options: ClientOptions) -> Result<reqwest::blocking::Client, ClientError> {
    let config = tls::client_config(options.roots, &options.pins)?;
    let mut builder = reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none());
    // Blocking clients default to a 30 s timeout; `None` means none here, as for `client`.
    builder = builder.timeout(options.timeout);
    builder.build().map_err(ClientError::Build)
}
