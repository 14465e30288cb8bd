//! Relay mode (`relay_listen`, ADR 0015): this agent accepts its downstream agents'
//! connections (TCP, or a unix socket file) and carries each as one stream over a single
//! connection to a gateway, so a site of many machines costs the gateway one socket.
//!
//! The relay is a byte pump and nothing more. It never parses what a downstream sends: the
//! downstream's TLS (to the gateway's name), its upgrade with its own token and its whole
//! session run end to end through the stream, so the relay can neither read nor alter its
//! traffic when the gateway speaks TLS, and holds no credential of anyone but itself. This
//! module owns the listener, the upstream connection (`/relay` on one of the agent's
//! gateways, with this agent's own token, reconnected with the agent's backoff, picking
//! another gateway after a failure) and the pairing of accepted sockets with streams.
//! While no upstream connection is up, downstream connections are closed at once, so the
//! downstreams fail over to their next URL instead of waiting.
//!
//! The agent's own session goes through its own listener (see [`own_gateways`]), so the
//! relay and all its downstreams hold exactly one gateway socket.
//!
//! A unix socket listener ([`Listener::bind`]) is a file whose permissions decide who may
//! be a downstream: it is created with mode 0660 (the mode is set on the socket before
//! `bind`, so the file never exists with more), replaces a stale file only when nothing
//! answers on it (a live one means another relay runs there), and is removed when the
//! relay stops, unless another file has taken its place.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use messages::relay::{HEADER_LEN, MAX_CHUNK, MAX_STREAMS, PATH};
use servicekit::clock::now_ms;
use servicekit::mux::Mux;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixSocket, UnixStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::config::{AgentConfig, RelayListen, UNIX_PREFIX, percent_encode_path};
use crate::transport::Transport;
use crate::trust::Credentials;

/// How often the relay pings its gateway (the gateway drops a relay silent for 60 s).
const PING_EVERY: Duration = Duration::from_secs(20);
/// Longest wait for TCP connect plus the upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Mode of a relay's unix socket file: its user and group may connect (connecting needs
/// write permission), nobody else.
pub(crate) const SOCKET_MODE: u32 = 0o660;
/// Longest wait for an existing socket file to answer before it is taken for live.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pending downstream connections the kernel queues on a unix socket listener.
const UNIX_BACKLOG: u32 = 1024;

/// The agent's gateway URLs rewritten to reach the gateways through its own relay
/// listener at `listen` (loopback when it listens on every address).
pub(crate) fn own_gateways(gateways: &[String], listen: &RelayListen) -> Vec<String> {
    let via = match listen {
        RelayListen::Tcp(addr) => {
            let mut local = *addr;
            if local.ip().is_unspecified() {
                local.set_ip(if local.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            local.to_string()
        }
        RelayListen::Unix(path) => format!(
            "{UNIX_PREFIX}{}",
            percent_encode_path(&path.to_string_lossy())
        ),
    };
    gateways
        .iter()
        .map(|url| {
            let (base, fragment) = url.split_once('#').unwrap_or((url, ""));
            let sep = if base.contains('?') { '&' } else { '?' };
            let mut out = format!("{base}{sep}via={via}");
            if !fragment.is_empty() {
                out.push('#');
                out.push_str(fragment);
            }
            out
        })
        .collect()
}

/// A gateway URL with its path replaced by the relay path (query and fragment dropped).
fn relay_url(gateway: &str) -> String {
    let (scheme, rest) = gateway.split_once("://").unwrap_or(("ws", gateway));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{authority}{PATH}")
}

/// Where downstream agents connect: a TCP listener or a unix socket file.
#[derive(Debug)]
pub(crate) enum Listener {
    /// `relay_listen = "IP:port"`.
    Tcp(TcpListener),
    /// `relay_listen = "unix:/path"`; the file goes with the listener.
    Unix(UnixListener, SocketFile),
}

impl Listener {
    /// Binds `at`; returns the listener and the address it is bound to (the port the
    /// system chose for port 0).
    pub(crate) async fn bind(at: &RelayListen) -> io::Result<(Listener, RelayListen)> {
        match at {
            RelayListen::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await?;
                let local = listener.local_addr()?;
                Ok((Listener::Tcp(listener), RelayListen::Tcp(local)))
            }
            RelayListen::Unix(path) => {
                let (listener, file) = bind_unix(path).await?;
                Ok((Listener::Unix(listener, file), at.clone()))
            }
        }
    }

    async fn accept(&self) -> io::Result<(Transport, String)> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, peer) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                Ok((Transport::Tcp(tcp), peer.to_string()))
            }
            Listener::Unix(l, file) => {
                let (unix, _) = l.accept().await?;
                let peer = unix
                    .peer_cred()
                    .ok()
                    .and_then(|c| c.pid())
                    .map_or_else(|| file.path.display().to_string(), |p| format!("pid {p}"));
                Ok((Transport::Unix(unix), peer))
            }
        }
    }
}

/// A unix socket file this relay created; removed when dropped if it is still the same
/// file (a file another process put there since is left alone).
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "Cannot remove the relay socket.");
        }
    }
}

/// Binds a unix socket file at `path` with [`SOCKET_MODE`], first removing a stale file a
/// previous run left (one nothing answers on) and refusing a live one or a file that is
/// not a socket.
async fn bind_unix(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
                // One that does not answer in time is busy, not dead.
                Ok(Ok(_)) | Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is listening on this socket (another relay?); \
                         stop it or choose another relay_listen",
                    ));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    tracing::info!(path = %path.display(), "Removed a stale relay socket.");
                }
                // Removed meanwhile: nothing to replace.
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not replacing it",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = restricted_socket()?;
    socket.bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    // The umask may have removed bits; the mode is meant to be exactly SOCKET_MODE.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    let listener = socket.listen(UNIX_BACKLOG)?;
    Ok((listener, file))
}

/// A unix stream socket whose file, once bound, allows at most [`SOCKET_MODE`]: Linux
/// creates the file with the socket's own mode less the umask, so setting that mode first
/// (through a duplicate descriptor: fchmod reaches the same socket) leaves no moment
/// between `bind` and a `chmod` in which others could connect.
fn restricted_socket() -> io::Result<UnixSocket> {
    use std::os::fd::AsFd;
    let socket = UnixSocket::new_stream()?;
    let dup = std::fs::File::from(socket.as_fd().try_clone_to_owned()?);
    dup.set_permissions(std::fs::Permissions::from_mode(SOCKET_MODE))?;
    Ok(socket)
}

/// Runs the relay on `listener` until `shutdown` turns true; a unix socket file is removed
/// when it returns.
pub(crate) async fn run(
    listener: Listener,
    config: AgentConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let current: Arc<Mutex<Option<Mux>>> = Arc::new(Mutex::new(None));
    let upstream = tokio::spawn(upstream_loop(
        config,
        Arc::clone(&current),
        shutdown.clone(),
    ));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "Relay accept failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mux = current.lock().ok().and_then(|m| m.clone());
        let Some(mux) = mux else {
            tracing::debug!(%peer, "No upstream; closing a downstream connection.");
            continue;
        };
        match mux.open() {
            Ok(mut stream) => {
                tokio::spawn(async move {
                    let mut socket = socket;
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut stream).await;
                });
            }
            Err(e) => tracing::warn!(%peer, error = %e, "No stream for a downstream connection."),
        }
    }
    drop(listener);
    let _ = upstream.await;
}

async fn upstream_loop(
    config: AgentConfig,
    current: Arc<Mutex<Option<Mux>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = config.node_id.to_string();
    let mut attempt: u32 = 0;
    let mut last_failed: Option<usize> = None;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let index = pick(config.gateways.len(), last_failed);
        let Some(gateway) = config.gateways.get(index) else {
            return;
        };
        let url = relay_url(gateway);
        // Read afresh each time: the session loop stores renewed credentials on disk.
        let token = Credentials::new(
            &node,
            config.token.clone(),
            config.token_file.clone(),
            config.credential_path.clone(),
        )
        .current(now_ms() / 1000);
        let connected = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&url, token.expose(), &config)) => r,
            _ = shutdown.changed() => return,
        };
        match connected {
            Ok(Ok(ws)) => {
                tracing::info!(%url, "Relay connected upstream.");
                attempt = 0;
                let (mux, frames) = Mux::new(false, MAX_STREAMS);
                if let Ok(mut slot) = current.lock() {
                    *slot = Some(mux.clone());
                }
                let why = serve(ws, &mux, frames, &mut shutdown).await;
                if let Ok(mut slot) = current.lock() {
                    *slot = None;
                }
                mux.close_all();
                tracing::warn!(%url, reason = %why, "Relay upstream connection ended.");
                last_failed = Some(index);
            }
            Ok(Err(e)) => {
                tracing::warn!(%url, error = %e, "Relay upstream connect failed.");
                last_failed = Some(index);
            }
            Err(_) => {
                tracing::warn!(%url, "Relay upstream connect timed out.");
                last_failed = Some(index);
            }
        }
        let delay = config.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(
    url: &str,
    token: &str,
    config: &AgentConfig,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    let value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|e| tokio_tungstenite::tungstenite::Error::HttpFormat(e.into()))?;
    request.headers_mut().insert("authorization", value);
    let ws_config = WebSocketConfig::default()
        .write_buffer_size(0)
        .max_message_size(Some(HEADER_LEN + MAX_CHUNK));
    let connector = config
        .tls
        .client_config()
        .map(|c| tokio_tungstenite::Connector::Rustls(Arc::clone(c)));
    let (ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config), true, connector)
            .await?;
    Ok(ws)
}

/// Moves frames both ways until the connection or the agent ends; says why.
async fn serve(
    mut ws: Ws,
    mux: &Mux,
    mut frames: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    shutdown: &mut watch::Receiver<bool>,
) -> String {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Binary(bytes))) => {
                    if let Err(e) = mux.on_frame(&bytes) {
                        return format!("bad frame from the gateway: {e}");
                    }
                }
                Some(Ok(Message::Close(close))) => return format!("closed by the gateway: {close:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("read: {e}"),
                None => return "eof".into(),
            },
            frame = frames.recv() => {
                let Some(frame) = frame else { return "mux ended".into() };
                if let Err(e) = ws.feed(Message::Binary(frame.into())).await {
                    return format!("write: {e}");
                }
                while let Ok(more) = frames.try_recv() {
                    if let Err(e) = ws.feed(Message::Binary(more.into())).await {
                        return format!("write: {e}");
                    }
                }
                if let Err(e) = ws.flush().await {
                    return format!("write: {e}");
                }
            }
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return format!("ping: {e}");
                }
            }
            _ = shutdown.changed() => {
                let _ = ws.close(None).await;
                return "shutdown".into();
            }
        }
    }
}

/// A random gateway, another than the one that just failed when there is a choice.
fn pick(count: usize, avoid: Option<usize>) -> usize {
    use rand::Rng;
    if count <= 1 {
        return 0;
    }
    let mut rng = rand::rng();
    loop {
        let i = rng.random_range(0..count);
        if Some(i) != avoid {
            return i;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::config::Via;

    #[test]
    fn own_gateways_go_through_the_local_listener() {
        let listen = RelayListen::Tcp("0.0.0.0:7000".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(
            own_gateways(
                &["wss://gw:8081/ws".into(), "ws://gw2/ws?codec=json".into()],
                &listen
            ),
            [
                "wss://gw:8081/ws?via=127.0.0.1:7000",
                "ws://gw2/ws?codec=json&via=127.0.0.1:7000"
            ]
        );
        assert_eq!(
            crate::config::via_of("ws://gw2/ws?codec=json&via=127.0.0.1:7000"),
            Ok(Some(Via::Tcp("127.0.0.1:7000".into())))
        );
    }

    #[test]
    fn own_gateways_through_a_unix_socket_name_it_percent_encoded() {
        let path = PathBuf::from("/run/edge dir/r&1#.sock");
        let urls = own_gateways(
            &["wss://gw:8081/ws#x".into()],
            &RelayListen::Unix(path.clone()),
        );
        assert_eq!(
            urls,
            ["wss://gw:8081/ws?via=unix:/run/edge%20dir/r%261%23.sock#x"]
        );
        // The agent's own session reads back exactly the socket it listens on.
        assert_eq!(
            urls.first().map(|u| crate::config::via_of(u)),
            Some(Ok(Some(Via::Unix(path))))
        );
    }

    #[tokio::test]
    async fn a_socket_file_is_born_with_no_more_than_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let socket = restricted_socket().unwrap();
        socket.bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // Whatever the umask removed, nothing beyond 0660 is there before any chmod.
        assert_eq!(mode & !SOCKET_MODE, 0, "{mode:o}");
    }

    #[test]
    fn relay_url_replaces_the_path() {
        assert_eq!(relay_url("wss://gw:8081/ws?via=x:1"), "wss://gw:8081/relay");
        assert_eq!(relay_url("ws://gw"), "ws://gw/relay");
    }
}
