//! The gateway's end of a relay connection (ADR 0015, `docs/protocol.md` 12.13).
//!
//! A relay agent upgrades on `/relay` with its own agent token; from then on its binary
//! messages are `messages::relay` frames and each stream it opens is one of its
//! downstreams' connections. The gateway serves each stream exactly as it serves a socket
//! accepted on its listener: TLS when it terminates TLS, then the HTTP upgrade on `/ws`
//! with the downstream's own token, then an ordinary session. So the downstream's identity,
//! admission, rate limits, heartbeats and close codes are the same as if it were connected
//! directly, the relay sees only ciphertext when the gateway speaks TLS, and the only thing
//! the relay adds is the [`Via`] tag its streams' sessions carry in their session events.
//!
//! This module owns the relay connection's lifetime: reading frames into the
//! [`servicekit::mux::Mux`], writing what it produces, pongs, the relay token's expiry, a
//! silence deadline (a relay pings; one that says nothing for [`SILENCE`] is gone), and
//! the scheduler's close of the relay's node ([`Relays`]): a revoked relay loses its relay
//! connection, and with it every downstream it carries, not only its own session.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use messages::relay::MAX_STREAMS;
use messages::{CloseCode, UserId};
use servicekit::mux::Mux;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use crate::Shared;
use crate::admission::Ticket;
use crate::auth::Identity;
use crate::transport::{Reader, Sink};
use crate::ws::{self, Message};

/// A relay that sends nothing (not even a ping) for this long is considered gone.
pub(crate) const SILENCE: Duration = Duration::from_secs(60);
/// Longest a downstream may take over its TLS handshake inside a stream.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection data of a stream a relay carries: the relay's node id.
#[derive(Debug, Clone)]
pub(crate) struct Via(pub UserId);

/// The relay connections this replica holds, by relay node.
///
/// The scheduler closes a node (revocation) with `ws-close` on `ws.agent.<node>`, which
/// only the hub receives, and only while the node has a session here. A relay's own
/// session runs through its own relay connection (the agent dials its own listener), so
/// when the hub closes that session it finds the relay connection here and closes it too;
/// if the close arrives while the relay's own session is down, the next one is refused at
/// its register and closed again, which closes the connection then.
#[derive(Debug, Clone, Default)]
pub struct Relays {
    open: Arc<Mutex<HashMap<UserId, Vec<Closer>>>>,
    next: Arc<AtomicU64>,
}

/// One relay connection's id and the sender that closes it.
type Closer = (u64, watch::Sender<Option<CloseCode>>);

impl Relays {
    /// Records a relay connection of `node` until the returned registration drops.
    pub fn register(&self, node: &UserId) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        if let Ok(mut open) = self.open.lock() {
            open.entry(node.clone()).or_default().push((id, tx));
        }
        Registration {
            relays: self.clone(),
            node: node.clone(),
            id,
            rx,
        }
    }

    /// Closes every relay connection of `node` with `code`; returns how many.
    pub fn close(&self, node: &UserId, code: CloseCode) -> usize {
        let Ok(open) = self.open.lock() else {
            return 0;
        };
        open.get(node).map_or(0, |conns| {
            conns.iter().for_each(|(_, tx)| {
                tx.send_replace(Some(code));
            });
            conns.len()
        })
    }

    /// Relay connections held here.
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .map(|open| open.values().map(Vec::len).sum())
            .unwrap_or(0)
    }

    /// Whether no relay connection is held here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One relay connection in [`Relays`]; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    relays: Relays,
    node: UserId,
    id: u64,
    rx: watch::Receiver<Option<CloseCode>>,
}

impl Registration {
    /// Resolves with the code once the connection is to be closed.
    pub async fn closed(&mut self) -> CloseCode {
        match self.rx.wait_for(Option::is_some).await {
            Ok(code) => code.unwrap_or(CloseCode::Kicked),
            // The sender lives in the map until this registration drops.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut open) = self.relays.open.lock()
            && let Some(conns) = open.get_mut(&self.node)
        {
            conns.retain(|(id, _)| *id != self.id);
            if conns.is_empty() {
                open.remove(&self.node);
            }
        }
    }
}

/// Serves an upgraded relay connection until it ends (on the worker's local executor:
/// the transport and the HTTP service are not `Send`).
pub(crate) fn serve(
    shared: Arc<Shared>,
    identity: Identity,
    ticket: Ticket,
    reader: Reader,
    sink: Sink,
    peer: Option<SocketAddr>,
) {
    actix_web::rt::spawn(run(shared, identity, ticket, reader, sink, peer));
}

async fn run(
    shared: Arc<Shared>,
    identity: Identity,
    ticket: Ticket,
    mut reader: Reader,
    sink: Sink,
    peer: Option<SocketAddr>,
) {
    let _ticket = ticket;
    let relay = identity.user_id;
    let mut registration = shared.hub.relays().register(&relay);
    shared.metrics.relays.inc();
    tracing::info!(%relay, ?peer, "Relay connected.");
    let (mux, frames) = Mux::new(true, MAX_STREAMS);
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let writer = actix_web::rt::spawn(write_loop(sink, frames, ctl_rx, Arc::clone(&shared)));
    let tls = match shared.config.tls.as_ref().map(|cert| cert.server_config()) {
        None => None,
        Some(Ok(config)) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        Some(Err(e)) => {
            tracing::error!(error = %e, "No TLS configuration for relayed streams; closing the relay.");
            let _ = ctl.send(ws::close(CloseCode::InternalError.code(), "tls"));
            drop(ctl);
            let _ = writer.await;
            shared.metrics.relays.dec();
            return;
        }
    };
    let now = tokio::time::Instant::now();
    let left = Duration::from_secs(
        identity
            .expires_at
            .saturating_sub(servicekit::clock::now_ms() / 1000),
    );
    // An absurd `exp` must not overflow the clock: a year is as good as forever here.
    let expiry = now
        .checked_add(left.min(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now);
    let mut silent_until = tokio::time::Instant::now() + SILENCE;
    // This connection's share of the streams gauge (a stream's session outlives its HTTP
    // exchange, so the mux's own count is the one that says what is open).
    let mut counted: i64 = 0;
    let reason = loop {
        let open = i64::try_from(mux.streams()).unwrap_or(i64::MAX);
        shared.metrics.relay_streams.inc_by(open - counted);
        counted = open;
        tokio::select! {
            message = reader.next() => {
                silent_until = tokio::time::Instant::now() + SILENCE;
                match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        shared.metrics.relay_bytes.inc_by(bytes.len() as u64);
                        match mux.on_frame(&bytes) {
                            Ok(Some((stream, io))) => {
                                spawn_stream(&shared, &relay, stream, io, tls.clone(), peer);
                            }
                            Ok(None) => {}
                            Err(e) => {
                                let _ = ctl.send(ws::close(CloseCode::ProtocolError.code(), "bad relay frame"));
                                break format!("bad frame: {e}");
                            }
                        }
                    }
                    Some(Ok(Message::Ping(payload))) => { let _ = ctl.send(ws::pong(&payload)); }
                    Some(Ok(Message::Pong)) => {}
                    Some(Ok(Message::Text)) => {
                        let _ = ctl.send(ws::close(CloseCode::ProtocolError.code(), "text message"));
                        break "text message".to_owned();
                    }
                    Some(Ok(Message::Close(code))) => {
                        let _ = ctl.send(ws::close_empty());
                        break format!("closed by the relay ({code:?})");
                    }
                    Some(Err(e)) => break format!("read: {e}"),
                    None => break "eof".to_owned(),
                }
            }
            () = tokio::time::sleep_until(expiry) => {
                let _ = ctl.send(ws::close(CloseCode::Unauthorized.code(), "credential expired"));
                break "credential expired".to_owned();
            }
            code = registration.closed() => {
                let _ = ctl.send(ws::close(code.code(), code.reason()));
                break format!("closed by the scheduler ({})", code.code());
            }
            () = tokio::time::sleep_until(silent_until) => {
                let _ = ctl.send(ws::close(CloseCode::HeartbeatTimeout.code(), "relay silent"));
                break "silent".to_owned();
            }
        }
    };
    // The downstreams' sessions end with their streams and reconnect on their own.
    mux.close_all();
    shared.metrics.relay_streams.dec_by(counted);
    drop(ctl);
    drop(mux);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    shared.metrics.relays.dec();
    tracing::info!(%relay, %reason, "Relay disconnected.");
}

/// Writes the mux's frames and the control messages, batched into vectored writes.
async fn write_loop(
    mut sink: Sink,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
    mut ctl: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<Shared>,
) {
    let mut queue = VecDeque::new();
    loop {
        tokio::select! {
            biased;
            control = ctl.recv() => match control {
                Some(bytes) => {
                    // A close frame (opcode 8) ends the connection: nothing follows it.
                    if bytes.first().is_some_and(|b| b & 0x0f == 0x8) {
                        let _ = sink.write_all(&mut queue).await;
                        let _ = sink.close(bytes).await;
                        return;
                    }
                    queue.push_back(bytes);
                    if sink.write_all(&mut queue).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            frame = frames.recv() => match frame {
                Some(frame) => {
                    shared.metrics.relay_bytes.inc_by(frame.len() as u64);
                    queue.push_back(ws::binary(&frame));
                    while let Ok(more) = frames.try_recv() {
                        shared.metrics.relay_bytes.inc_by(more.len() as u64);
                        queue.push_back(ws::binary(&more));
                        if queue.len() >= 64 {
                            break;
                        }
                    }
                    if sink.write_all(&mut queue).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
}

/// Serves one stream like an accepted socket: TLS if configured, then HTTP.
fn spawn_stream(
    shared: &Arc<Shared>,
    relay: &UserId,
    stream: u32,
    io: tokio::io::DuplexStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: Option<SocketAddr>,
) {
    let shared = Arc::clone(shared);
    let via = relay.clone();
    actix_web::rt::spawn(async move {
        match tls {
            None => serve_http(&shared, via, io, peer).await,
            Some(acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(io)) => serve_http(&shared, via, io, peer).await,
                    Ok(Err(e)) => {
                        tracing::info!(relay = %via, stream, error = %e, "TLS handshake on a relayed stream failed.");
                    }
                    Err(_) => {
                        tracing::info!(relay = %via, stream, "TLS handshake on a relayed stream timed out.");
                    }
                }
            }
        }
    });
}

async fn serve_http<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    shared: &Arc<Shared>,
    via: UserId,
    io: T,
    peer: Option<SocketAddr>,
) {
    crate::serve_relayed(shared, via, io, peer).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_close_reaches_every_relay_connection_of_the_node_and_only_those() {
        let relays = Relays::default();
        let node = UserId::new("relay-1").unwrap();
        let mut a = relays.register(&node);
        let mut b = relays.register(&node);
        let mut other = relays.register(&UserId::new("relay-2").unwrap());
        assert_eq!(relays.len(), 3);
        assert_eq!(relays.close(&node, CloseCode::Revoked), 2);
        assert_eq!(a.closed().await, CloseCode::Revoked);
        assert_eq!(b.closed().await, CloseCode::Revoked);
        let pending = tokio::time::timeout(Duration::from_millis(50), other.closed()).await;
        assert!(pending.is_err(), "another node's relay stays open");
        drop(a);
        drop(b);
        assert_eq!(relays.len(), 1, "a dropped registration is forgotten");
        assert_eq!(relays.close(&node, CloseCode::Revoked), 0);
    }
}
