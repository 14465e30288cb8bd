//! The scheduler's end of TCP tunnels (docs/protocol.md 12.12, ADR 0014): the registry of
//! open streams, and the routing of agents' tunnel frames to them.
//!
//! An operator's WebSocket (`GET /v1/agents/{id}/tunnel`, in the HTTP module) registers a
//! stream here, which counts against the agent's and the API key's caps until the
//! [`Registration`] is dropped. Frames an agent publishes for the stream arrive on the bus
//! consumer and are handed to the stream's bridge only if they come from the stream's node
//! (the gateway's verified `ws-user`) and carry its token. Streams exist only on the active
//! instance and only in memory: a restart or failover cuts them, as it would cut any TCP
//! connection through a restarted proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use messages::UserId;
use messages::payload::{self, PayloadError};
use messages::tunnel::{self, CloseReason};
use tokio::sync::mpsc;

use crate::Shared;

/// A frame for one stream's bridge, already matched to it.
#[derive(Debug)]
pub(crate) enum Up {
    /// The agent dialled the remote address; the downward window.
    Opened(u32),
    /// Bytes from the remote.
    Data(tunnel::Data),
    /// The agent delivered bytes: more credit.
    Window(u32),
    /// The agent's end closed (or never opened).
    Close(CloseReason, String),
}

/// Why a stream could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CapError {
    /// The agent has its cap of streams open.
    #[error("{0} tunnel streams are open to this agent (the scheduler's cap)")]
    Agent(usize),
    /// The API key has its cap of streams open.
    #[error("{0} tunnel streams are open for this API key (the scheduler's cap)")]
    Key(usize),
}

#[derive(Debug)]
struct Entry {
    node: UserId,
    key: String,
    token: Vec<u8>,
    tx: mpsc::UnboundedSender<Up>,
}

#[derive(Debug, Default)]
struct Inner {
    streams: HashMap<u64, Entry>,
    per_node: HashMap<UserId, usize>,
    per_key: HashMap<String, usize>,
}

/// The open streams of this instance.
#[derive(Debug)]
pub struct Tunnels {
    inner: Mutex<Inner>,
    next: AtomicU64,
}

impl Default for Tunnels {
    fn default() -> Self {
        // A random start keeps ids of a restarted instance clear of streams an agent may
        // still hold from the previous one.
        Tunnels {
            inner: Mutex::new(Inner::default()),
            next: AtomicU64::new((rand::random::<u64>() >> 2).max(1)),
        }
    }
}

/// A registered stream; dropping it forgets the stream and frees its cap slots.
#[derive(Debug)]
pub(crate) struct Registration {
    shared: Arc<Shared>,
    /// Stream id.
    pub stream: u64,
    /// Its token.
    pub token: Vec<u8>,
    /// The agent.
    pub node: UserId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.tunnels.remove(self.stream);
    }
}

impl Tunnels {
    /// Streams open now.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.streams.len()).unwrap_or(0)
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, stream: u64) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(e) = inner.streams.remove(&stream)
        {
            if let Some(n) = inner.per_node.get_mut(&e.node) {
                *n = n.saturating_sub(1);
            }
            if let Some(n) = inner.per_key.get_mut(&e.key) {
                *n = n.saturating_sub(1);
            }
        }
    }

    /// Every stream of `node` learns that its agent's connection went away.
    pub fn gone(&self, node: &UserId) {
        if let Ok(inner) = self.inner.lock() {
            for e in inner.streams.values().filter(|e| &e.node == node) {
                let _ = e.tx.send(Up::Close(
                    CloseReason::Gone,
                    "the agent's connection went away".into(),
                ));
            }
        }
    }
}

/// Registers a stream to `node` for API key `key`, within the caps.
pub(crate) fn register(
    shared: &Arc<Shared>,
    node: &UserId,
    key: &str,
) -> Result<(Registration, mpsc::UnboundedReceiver<Up>), CapError> {
    let tunnels = &shared.tunnels;
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = tunnels.next.fetch_add(1, Ordering::Relaxed);
    let token: Vec<u8> = (0..tunnel::TOKEN_LEN)
        .map(|_| rand::random::<u8>())
        .collect();
    {
        let (max_node, max_key) = (
            shared.config.tunnel_max_per_agent,
            shared.config.tunnel_max_per_key,
        );
        let mut inner = tunnels.inner.lock().map_err(|_| CapError::Agent(0))?;
        if inner.per_node.get(node).copied().unwrap_or(0) >= max_node {
            return Err(CapError::Agent(max_node));
        }
        if inner.per_key.get(key).copied().unwrap_or(0) >= max_key {
            return Err(CapError::Key(max_key));
        }
        *inner.per_node.entry(node.clone()).or_default() += 1;
        *inner.per_key.entry(key.to_owned()).or_default() += 1;
        inner.streams.insert(
            stream,
            Entry {
                node: node.clone(),
                key: key.to_owned(),
                token: token.clone(),
                tx,
            },
        );
    }
    Ok((
        Registration {
            shared: Arc::clone(shared),
            stream,
            token,
            node: node.clone(),
        },
        rx,
    ))
}

/// Whether `route` is an agent's tunnel frame (handled here, not by the store's consumer).
pub(crate) fn is_tunnel_route(route: &str) -> bool {
    matches!(
        route,
        tunnel::OPENED | tunnel::DATA | tunnel::WINDOW | tunnel::CLOSE
    )
}

/// Routes a tunnel frame `node` published to its stream's bridge; frames for unknown
/// streams, from another node or with a wrong token are dropped.
pub(crate) fn on_upstream(
    shared: &Shared,
    node: &UserId,
    route: &str,
    body: &[u8],
) -> Result<(), PayloadError> {
    let (stream, token, up) = match route {
        tunnel::OPENED => {
            let o: tunnel::Opened = payload::from_bus(body)?;
            (o.stream, o.token, Up::Opened(o.window))
        }
        tunnel::DATA => {
            let d: tunnel::Data = payload::from_bus(body)?;
            (d.stream, d.token.clone(), Up::Data(d))
        }
        tunnel::WINDOW => {
            let w: tunnel::Window = payload::from_bus(body)?;
            (w.stream, w.token, Up::Window(w.grant))
        }
        tunnel::CLOSE => {
            let c: tunnel::Close = payload::from_bus(body)?;
            (c.stream, c.token, Up::Close(c.reason, c.detail))
        }
        _ => return Ok(()),
    };
    let Ok(inner) = shared.tunnels.inner.lock() else {
        return Ok(());
    };
    match inner.streams.get(&stream) {
        Some(e) if &e.node == node && tunnel::token_eq(&e.token, &token) => {
            let _ = e.tx.send(up);
        }
        Some(_) => {
            tracing::warn!(%node, stream, %route, "Tunnel frame from the wrong node or with a wrong token dropped.");
        }
        None => {}
    }
    Ok(())
}
