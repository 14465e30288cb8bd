//! A WebSocket test client over a real TCP socket: connects with a token, decodes frames
//! with the real codec, and waits with timeouts so a broken test fails instead of hanging.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use messages::payload::{self, Welcome};
use messages::{BodyCodec, Frame, FrameKind, Limits};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, client_async_with_config};

/// The HS256 secret tests sign tokens with.
pub const TEST_SECRET: &str = "testkit-secret-testkit-secret-0123456789";

/// The agent-token signing key tests use (Ed25519, PKCS#8 PEM): what the scheduler
/// signs agent tokens with. Never use it outside tests.
pub const TEST_AGENT_TOKEN_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIEBykobnOVH5foZ2jOAFvLLYgOgH8cjnSSH0VSATDLjo
-----END PRIVATE KEY-----
";

/// The public half of [`TEST_AGENT_TOKEN_KEY`]: what test gateways verify agent tokens with.
pub const TEST_AGENT_TOKEN_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAV8WP3HUnPcY139PyyCWSITJJRV/dDiD9Shu7eTVTqJk=
-----END PUBLIC KEY-----
";

/// The command-signing key tests use: what the scheduler signs agent commands with.
pub const TEST_COMMAND_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIA1ea86/cNztCpLY+QocOm+cJYrwdK82LnXhcoLeBfJF
-----END PRIVATE KEY-----
";

/// The public half of [`TEST_COMMAND_KEY`]: what test agents pin.
pub const TEST_COMMAND_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEALTHYjnKlw7ZNdriaHg3X2s7dv4STBmcwKlO9MOAPCRg=
-----END PUBLIC KEY-----
";

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A token for `user` with optional `kind` and `rooms`, valid for an hour: HS256 with
/// [`TEST_SECRET`] for app clients, EdDSA with [`TEST_AGENT_TOKEN_KEY`] for `kind: agent`
/// (agent tokens verify only against the agent-token key).
pub fn token(user: &str, kind: Option<&str>, rooms: &[&str]) -> String {
    let exp = servicekit::clock::now_secs() + 3600;
    token_with(
        &serde_json::json!({"sub": user, "exp": exp, "kind": kind.unwrap_or("app"), "rooms": rooms}),
    )
}

/// Signs arbitrary claims: with [`TEST_AGENT_TOKEN_KEY`] when `kind` is `agent`, with
/// [`TEST_SECRET`] otherwise.
pub fn token_with(claims: &serde_json::Value) -> String {
    if claims.get("kind").and_then(|k| k.as_str()) == Some("agent") {
        return agent_token_with(claims);
    }
    app_token_with(claims)
}

/// Signs claims with the app secret whatever they say (to forge an agent token, say).
pub fn app_token_with(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap_or_default()
}

/// Signs claims with the test agent-token key.
pub fn agent_token_with(claims: &serde_json::Value) -> String {
    let Ok(key) = EncodingKey::from_ed_pem(TEST_AGENT_TOKEN_KEY.as_bytes()) else {
        return String::new();
    };
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key).unwrap_or_default()
}

/// What came back instead of the expected frame.
#[derive(Debug)]
pub enum Received {
    /// A frame.
    Frame(Frame),
    /// A close with its code.
    Close(Option<u16>),
    /// The connection ended without a close frame (or errored).
    Ended(String),
    /// Nothing arrived in time.
    Timeout,
}

/// A connected test client.
#[derive(Debug)]
pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The welcome frame's body.
    pub welcome: Welcome,
    codec: BodyCodec,
}

/// Why a connection attempt did not produce a session.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade with this HTTP status.
    Status(u16),
    /// The TLS handshake failed (the message says why).
    Tls(String),
    /// Something else went wrong.
    Other(String),
}

impl TestClient {
    /// Connects to `ws://addr/ws` with `token` in the Authorization header and waits for the
    /// welcome.
    pub async fn connect(addr: SocketAddr, token: &str) -> Result<Self, ConnectError> {
        Self::connect_with(addr, Some(token), "", None).await
    }

    /// Connects with full control: token in the header (or none), an extra query string,
    /// and an optional receive-buffer size for the socket (to make a slow reader).
    pub async fn connect_with(
        addr: SocketAddr,
        token: Option<&str>,
        query: &str,
        recv_buffer: Option<u32>,
    ) -> Result<Self, ConnectError> {
        Self::connect_inner(addr, token, query, recv_buffer, None).await
    }

    /// Connects from the local address `source` (a loopback alias such as 127.0.0.2), to
    /// look like another client host.
    pub async fn connect_from(
        addr: SocketAddr,
        token: &str,
        source: std::net::IpAddr,
    ) -> Result<Self, ConnectError> {
        Self::connect_inner(addr, Some(token), "", None, Some(source)).await
    }

    /// Connects over TLS (`wss://localhost`) with `tls` as the client configuration.
    pub async fn connect_tls(
        addr: SocketAddr,
        token: &str,
        tls: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Self, ConnectError> {
        let other = |e: &dyn std::fmt::Display| ConnectError::Other(e.to_string());
        let mut request = format!("wss://localhost:{}/ws", addr.port())
            .into_client_request()
            .map_err(|e| other(&e))?;
        let value = format!("Bearer {token}").parse().map_err(|e| other(&e))?;
        request.headers_mut().insert("authorization", value);
        let tcp = TcpStream::connect(addr).await.map_err(|e| other(&e))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| other(&e))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        Self::handshake(request, MaybeTlsStream::Rustls(tls), "").await
    }

    /// The leaf certificate the server presented (DER), on a TLS connection.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self.ws.get_ref() {
            MaybeTlsStream::Rustls(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
            _ => None,
        }
    }

    async fn connect_inner(
        addr: SocketAddr,
        token: Option<&str>,
        query: &str,
        recv_buffer: Option<u32>,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self, ConnectError> {
        let url = format!(
            "ws://{addr}/ws{}{query}",
            if query.is_empty() { "" } else { "?" }
        );
        let mut request = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ConnectError::Other("header".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let socket =
            tokio::net::TcpSocket::new_v4().map_err(|e| ConnectError::Other(e.to_string()))?;
        if let Some(size) = recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .map_err(|e| ConnectError::Other(e.to_string()))?;
        }
        if let Some(source) = source {
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| ConnectError::Other(e.to_string()))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        Self::handshake(request, MaybeTlsStream::Plain(stream), query).await
    }

    /// The WebSocket handshake on a connected stream, then the wait for the welcome.
    async fn handshake(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
        stream: MaybeTlsStream<TcpStream>,
        query: &str,
    ) -> Result<Self, ConnectError> {
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, _) = client_async_with_config(request, stream, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    ConnectError::Status(resp.status().as_u16())
                }
                other => ConnectError::Other(other.to_string()),
            })?;
        let codec = if query.contains("codec=json") {
            BodyCodec::Json
        } else {
            BodyCodec::MsgPack
        };
        let mut ws = ws;
        match recv_on(&mut ws, WAIT).await {
            Received::Frame(f) if f.kind == FrameKind::Welcome => {
                let welcome = payload::decode_body(f.flags.codec(), &f.body)
                    .map_err(|e| ConnectError::Other(e.to_string()))?;
                Ok(TestClient { ws, welcome, codec })
            }
            other => Err(ConnectError::Other(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    /// Codec the gateway uses for this client's control bodies.
    pub fn codec(&self) -> BodyCodec {
        self.codec
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &Frame) {
        let _ = self.ws.send(Message::Binary(frame.encode())).await;
    }

    /// Sends raw bytes as one binary message.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.ws.send(Message::Binary(Bytes::from(bytes))).await;
    }

    /// Sends a WebSocket ping (a control frame, not a protocol frame).
    pub async fn send_ping(&mut self, payload: &[u8]) {
        let _ = self
            .ws
            .send(Message::Ping(Bytes::copy_from_slice(payload)))
            .await;
    }

    /// Sends a WebSocket pong nobody asked for.
    pub async fn send_pong(&mut self, payload: &[u8]) {
        let _ = self
            .ws
            .send(Message::Pong(Bytes::copy_from_slice(payload)))
            .await;
    }

    /// Reads until something other than a pong arrives (within [`WAIT`]) and returns the
    /// payloads of the pongs read on the way, with what ended the wait.
    pub async fn pongs_until_frame(&mut self) -> (Vec<Bytes>, Received) {
        self.pongs_until_frame_within(WAIT).await
    }

    /// [`TestClient::pongs_until_frame`], waiting at most `wait` in all.
    pub async fn pongs_until_frame_within(&mut self, wait: Duration) -> (Vec<Bytes>, Received) {
        let deadline = tokio::time::Instant::now() + wait;
        let limits = Limits {
            max_route_len: 255,
            max_body_len: 16 << 20,
        };
        let mut pongs = Vec::new();
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return (pongs, Received::Timeout),
                Ok(None) => return (pongs, Received::Ended("stream ended".into())),
                Ok(Some(Err(e))) => return (pongs, Received::Ended(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            match next {
                Message::Pong(payload) => pongs.push(payload),
                Message::Binary(bytes) => {
                    let got = match Frame::decode(&bytes, &limits) {
                        Ok(frame) => Received::Frame(frame),
                        Err(e) => Received::Ended(format!("undecodable frame from server: {e}")),
                    };
                    return (pongs, got);
                }
                Message::Close(close) => {
                    return (pongs, Received::Close(close.map(|c| u16::from(c.code))));
                }
                Message::Ping(_) | Message::Frame(_) => {}
                Message::Text(t) => {
                    return (pongs, Received::Ended(format!("unexpected text: {t}")));
                }
            }
        }
    }

    /// Reads until a close arrives and returns its code and reason.
    pub async fn close_frame(&mut self) -> Option<(u16, String)> {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next()).await.ok()??;
            match next {
                Ok(Message::Close(close)) => {
                    return close.map(|c| (u16::from(c.code), c.reason.to_string()));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: &str) {
        let _ = self.ws.send(Message::Text(text.into())).await;
    }

    /// The next frame, close or end, waiting at most [`WAIT`].
    pub async fn recv(&mut self) -> Received {
        self.recv_within(WAIT).await
    }

    /// The next frame, close or end, waiting at most `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Received {
        recv_on(&mut self.ws, wait).await
    }

    /// The next frame, skipping heartbeat acks; panics (test helper) on anything else.
    pub async fn frame(&mut self) -> Frame {
        loop {
            match self.recv().await {
                Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {}
                Received::Frame(f) => return f,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// Reads until a close arrives (skipping frames) and returns its code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                Received::Frame(_) => {}
                Received::Close(code) => return code,
                Received::Ended(_) => return None,
                Received::Timeout => panic!("no close within {WAIT:?}"),
            }
        }
    }

    /// Asserts nothing but heartbeat acks arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        loop {
            match self.recv_within(wait).await {
                Received::Timeout => return,
                Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {}
                other => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

async fn recv_on(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>, wait: Duration) -> Received {
    let limits = Limits {
        max_route_len: 255,
        max_body_len: 16 << 20,
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Received::Timeout,
            Ok(None) => return Received::Ended("stream ended".into()),
            Ok(Some(Err(e))) => return Received::Ended(e.to_string()),
            Ok(Some(Ok(m))) => m,
        };
        match next {
            Message::Binary(bytes) => {
                return match Frame::decode(&bytes, &limits) {
                    Ok(frame) => Received::Frame(frame),
                    Err(e) => Received::Ended(format!("undecodable frame from server: {e}")),
                };
            }
            Message::Close(close) => return Received::Close(close.map(|c| u16::from(c.code))),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Text(t) => return Received::Ended(format!("unexpected text: {t}")),
        }
    }
}
