//! One client connection: token signing, TCP connect from a chosen 127.0.0.x source
//! address, WebSocket handshake with small buffers, and waiting for the welcome. Shared by
//! every scenario; what a connection does after the welcome lives in the scenario modules.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use messages::payload::{self, Welcome};
use messages::{Frame, FrameKind, Limits};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Error type of the generator's fallible paths.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client WebSocket over TCP, with TLS for `wss://` URLs.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// The TLS client configuration for `wss://` targets: the CAs in `LOADTEST_CA_FILE` (the
/// system store without it), and no session resumption, so every connection pays a full
/// handshake (the figure measured; a real client resuming pays less).
fn tls_config() -> Result<Arc<rustls::ClientConfig>, BoxError> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(Arc::clone(config));
    }
    let roots = match std::env::var_os("LOADTEST_CA_FILE") {
        Some(path) => servicekit::tls::roots_from_file(std::path::Path::new(&path))?,
        None => servicekit::tls::platform_roots()?,
    };
    let mut config = servicekit::tls::client_config(roots, &[])?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::clone(CONFIG.get_or_init(|| Arc::new(config))))
}

/// Longest wait for the welcome after the handshake.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Frame limits for what gateways send us.
pub(crate) fn limits() -> Limits {
    Limits {
        max_route_len: 255,
        max_body_len: 16 << 20,
    }
}

/// Signs an HS256 token for `user`; `kind` is the client kind claim (`app`, `agent`).
/// Signs an agent token with the agent-token key (Ed25519 PKCS#8 PEM), as the scheduler
/// does: gateways accept agents only with such tokens. Empty if the key does not parse.
pub(crate) fn sign_agent(agent_key_pem: &str, node: &str) -> String {
    let exp = servicekit::clock::now_secs() + 86_400;
    let claims = serde_json::json!({"sub": node, "exp": exp, "kind": "agent"});
    let Ok(key) = jsonwebtoken::EncodingKey::from_ed_pem(agent_key_pem.as_bytes()) else {
        return String::new();
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &key,
    )
    .unwrap_or_default()
}

/// Signs an app token with the HS256 secret.
pub(crate) fn sign(secret: &str, user: &str, kind: &str) -> String {
    let exp = servicekit::clock::now_secs() + 86_400;
    let claims = serde_json::json!({"sub": user, "exp": exp, "kind": kind});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// The source address for connection number `i` when spreading over `sources` addresses
/// starting at 127.0.0.`first`.
pub(crate) fn source_for(i: usize, first: u8, sources: u8) -> Ipv4Addr {
    let n = usize::from(sources.max(1));
    let last = (usize::from(first) + (i % n)).min(254) as u8;
    Ipv4Addr::new(127, 0, 0, last)
}

/// Opens a WebSocket to `url` from `source` (when the target is loopback) with the token
/// in the `Authorization` header, and reads until the welcome.
pub(crate) async fn connect(
    url: &str,
    token: &str,
    source: Ipv4Addr,
) -> Result<(Ws, Welcome), BoxError> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let host = request.uri().host().ok_or("url without host")?.to_owned();
    let tls = request.uri().scheme_str() == Some("wss");
    let port = request
        .uri()
        .port_u16()
        .unwrap_or(if tls { 443 } else { 80 });
    // `?via=host:port` (ADR 0015): TCP to that relay, TLS and the upgrade still for `host`.
    let via = url
        .split_once('?')
        .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("via=")))
        .map(str::to_owned);
    let target: SocketAddr = match via {
        Some(via) => tokio::net::lookup_host(via.as_str())
            .await?
            .next()
            .ok_or("no relay address")?,
        None => match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await?
                .next()
                .ok_or("no address")?,
        },
    };
    let socket = TcpSocket::new_v4()?;
    if target.ip().is_loopback() {
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    let stream = if tls {
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, stream)
            .await?;
        MaybeTlsStream::Rustls(tls)
    } else {
        MaybeTlsStream::Plain(stream)
    };
    // Small buffers: the client's memory is not what is being measured (docs/dependencies.md, trap 9).
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    loop {
        match tokio::time::timeout(WELCOME_TIMEOUT, ws.next()).await? {
            Some(Ok(Message::Binary(bytes))) => {
                let frame = Frame::decode(&bytes, &limits())?;
                if frame.kind == FrameKind::Welcome {
                    let welcome: Welcome = payload::decode_body(frame.flags.codec(), &frame.body)?;
                    return Ok((ws, welcome));
                }
            }
            Some(Ok(Message::Close(c))) => {
                return Err(format!("closed before welcome: {c:?}").into());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err("closed before welcome".into()),
        }
    }
}

/// Body layout of a measured push: send time (Unix µs, u64 BE), then sequence (u64 BE),
/// then padding.
pub(crate) fn stamped_body(seq: u64, size: usize) -> Vec<u8> {
    let mut body = vec![b'x'; size.max(16)];
    body[..8].copy_from_slice(&messages::headers::now_micros().to_be_bytes());
    body[8..16].copy_from_slice(&seq.to_be_bytes());
    body
}

/// Reads a measured push's send time and sequence.
pub(crate) fn read_stamp(body: &[u8]) -> Option<(u64, u64)> {
    let sent = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((sent, seq))
}
