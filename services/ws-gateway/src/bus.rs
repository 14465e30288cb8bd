//! The NATS side of the gateway: one publisher task that hands upstream frames and events
//! to the bus in order, the subscriptions that bring pushes and control messages down, and
//! the periodic presence batches.
//!
//! Everything here runs on a dedicated multi-thread Tokio runtime that owns the async-nats
//! connection (docs/dependencies.md, trap 5): actix workers are single-threaded runtimes, and the NATS
//! connection must not depend on one of them. Actors reach this side through a bounded
//! queue (`try_send`, never blocking) and are reached back through their addresses.
//!
//! Downstream, a bus message becomes one push, encoded once as a complete WebSocket message
//! (frame header included); every local recipient gets a reference-counted clone of the
//! same buffer and writes it as it is.
//!
//! A subscription counts as live only once the server has processed it. async-nats'
//! `flush` only writes the socket, so liveness is proved with a [`Probe`]: a message to the
//! gateway's own probe subject, published after the SUB on the same connection, comes back
//! only after the server has handled the SUB (a server processes one client's protocol
//! operations in order). Concurrent subscriptions share one probe round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::Addr;
use async_nats::{Client, HeaderMap};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use messages::envelope::{AgentClose, DeliveredEnvelope, HeartbeatEnvelope, PushEnvelope};
use messages::frame::{encode_parts, encoded_len};
use messages::payload::{self, GatewayControl, HeartbeatBatch};
use messages::subject::{self, Event};
use messages::{
    ClientKind, CloseCode, ErrorCode, FrameKind, GatewayId, RoomId, SocketId, UserId, headers,
};
use servicekit::telemetry::{MessageSpan, Operation};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::Shared;
use crate::registry::Subscription;
use crate::session::{Conn, ConnHandle, ToConn};
use servicekit::clock::now_ms;

/// Capacity of the queue between actors and the publisher task.
const OUTBOUND_CAPACITY: usize = 16 * 1024;
/// Entries per presence batch message (keeps each well under NATS' max payload).
const PRESENCE_CHUNK: usize = 2_000;
/// How long the prober waits for one probe before sending the next regardless.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// How long the first probe may take before the gateway reports the problem (again).
const FIRST_PROBE_WAIT: Duration = Duration::from_secs(5);

/// Something for the publisher task.
#[derive(Debug)]
pub enum Outbound {
    /// Publish one message; on success, tell `reply`'s actor its frame was published.
    Publish {
        /// Subject.
        subject: String,
        /// Headers.
        headers: HeaderMap,
        /// Body bytes, untouched.
        payload: Bytes,
        /// Actor and client frame id to acknowledge.
        reply: Option<(Addr<Conn>, u64)>,
    },
    /// Flush everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

/// Handle to the bus side, shared by every actor.
#[derive(Debug)]
pub struct Bus {
    client: Client,
    runtime: tokio::runtime::Handle,
    outbound: mpsc::Sender<Outbound>,
    probe: Arc<Probe>,
}

/// Round trips through this gateway's own NATS server, proving that every SUB sent before a
/// [`Probe::confirm`] call has been processed. Probe bodies carry this process's nonce and a
/// sequence number; bodies with another nonce (another replica of the same name, a stray
/// publisher) are ignored.
#[derive(Debug)]
pub struct Probe {
    subject: String,
    nonce: u64,
    /// Highest sequence number any caller asked to have confirmed.
    requested: AtomicU64,
    /// Highest sequence number that came back.
    confirmed: watch::Sender<u64>,
    wake: Notify,
}

impl Probe {
    fn new(subject: String) -> Self {
        Probe {
            subject,
            nonce: rand::random(),
            requested: AtomicU64::new(0),
            confirmed: watch::channel(0).0,
            wake: Notify::new(),
        }
    }

    /// Resolves once a probe published after this call has come back, i.e. once the server
    /// has processed every subscription this client sent before the call. Never resolves
    /// while the server does not answer; callers bound it with a timeout.
    pub async fn confirm(&self) {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut confirmed = self.confirmed.subscribe();
        self.wake.notify_one();
        let _ = confirmed.wait_for(|seq| *seq >= ticket).await;
    }

    fn received(&self, body: &[u8]) {
        let (Some(nonce), Some(seq)) = (
            body.get(..8).and_then(|b| b.try_into().ok()),
            body.get(8..16).and_then(|b| b.try_into().ok()),
        ) else {
            return;
        };
        if u64::from_be_bytes(nonce) != self.nonce {
            return;
        }
        let seq = u64::from_be_bytes(seq);
        self.confirmed.send_if_modified(|c| {
            let newer = seq > *c;
            if newer {
                *c = seq;
            }
            newer
        });
    }
}

/// Probes until the first answer, saying loudly why sessions are refused meanwhile: a
/// probe that never returns is nearly always a NATS user without permission for the probe
/// subject (an `auth.conf` from before the probe existed).
async fn first_probe(probe: Arc<Probe>) {
    while tokio::time::timeout(FIRST_PROBE_WAIT, probe.confirm())
        .await
        .is_err()
    {
        tracing::error!(
            subject = %probe.subject,
            "Subscription probe unanswered; not ready, no session can be confirmed. Check that \
             this gateway's NATS user may publish and subscribe to the probe subject \
             (nats/auth.conf)."
        );
    }
}

/// Publishes probes one at a time, each covering every request made before it: the next
/// probe goes out only once the previous one came back (or a second passed), so under a
/// connect storm thousands of subscriptions share one round trip instead of each paying a
/// publish and a delivery.
async fn prober(client: Client, probe: Arc<Probe>) {
    let mut confirmed = probe.confirmed.subscribe();
    loop {
        probe.wake.notified().await;
        let wanted = probe.requested.load(Ordering::SeqCst);
        if wanted <= *confirmed.borrow_and_update() {
            continue;
        }
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&probe.nonce.to_be_bytes());
        body[8..].copy_from_slice(&wanted.to_be_bytes());
        // A probe lost to a disconnect leaves its waiters to their timeouts; the next request
        // publishes a newer one.
        if let Err(e) = client
            .publish(probe.subject.clone(), Bytes::copy_from_slice(&body))
            .await
        {
            tracing::debug!(error = %e, "Subscription probe not published.");
            continue;
        }
        let _ = tokio::time::timeout(PROBE_WAIT, confirmed.wait_for(|seq| *seq >= wanted)).await;
        // Requests that arrived meanwhile left a permit on `wake`: the loop goes round again.
    }
}

impl Bus {
    /// Wraps a connected client and starts the publisher task on `runtime`.
    pub fn start(
        client: Client,
        runtime: tokio::runtime::Handle,
        shared_metrics: Arc<crate::metrics::Metrics>,
        instance: &GatewayId,
    ) -> Self {
        let (outbound, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        runtime.spawn(publisher(client.clone(), rx, shared_metrics));
        let probe = Arc::new(Probe::new(subject::gateway_probe(instance)));
        runtime.spawn(prober(client.clone(), Arc::clone(&probe)));
        Bus {
            client,
            runtime,
            outbound,
            probe,
        }
    }

    /// Whether a subscription probe has ever come back: until then no session can be
    /// confirmed, so the replica is not ready.
    pub fn probe_answered(&self) -> bool {
        *self.probe.confirmed.borrow() > 0
    }

    /// Whether the NATS connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The client (for the lease and tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The runtime the bus side runs on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Queues a message for the bus without waiting. Fails fast, with a reason for the
    /// client, when NATS is down or the queue is full: the caller reports it; nothing is
    /// dropped silently.
    pub fn send(&self, out: Outbound) -> Result<(), &'static str> {
        if !self.connected() {
            return Err("message bus unavailable; not delivered");
        }
        self.outbound.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "gateway publish queue full; not delivered",
            mpsc::error::TrySendError::Closed(_) => "gateway shutting down; not delivered",
        })
    }

    /// Whether [`Bus::send`] would currently accept a message (connected, queue not full).
    pub fn send_ok(&self) -> bool {
        self.connected() && self.outbound.capacity() > 0
    }

    /// Waits until everything queued so far has been written to NATS and flushed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.outbound.send(Outbound::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn publisher(
    client: Client,
    mut rx: mpsc::Receiver<Outbound>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Publish {
                subject,
                mut headers,
                payload,
                reply,
            } => {
                headers::stamp_hop(
                    &mut headers,
                    headers::hop::GATEWAY_PUB,
                    headers::now_micros(),
                );
                match client.publish_with_headers(subject, headers, payload).await {
                    Ok(()) => {
                        metrics.published.inc();
                        if let Some((addr, msg_id)) = reply {
                            addr.do_send(ToConn::Published(msg_id));
                        }
                    }
                    Err(e) => {
                        metrics.publish_errors.inc();
                        tracing::warn!(error = %e, "NATS publish failed.");
                        if let Some((addr, msg_id)) = reply {
                            addr.do_send(ToConn::Failed {
                                msg_id,
                                code: ErrorCode::Unavailable,
                                message: "message bus unavailable; not delivered".into(),
                            });
                        }
                    }
                }
            }
            Outbound::Flush(done) => {
                if let Err(e) = client.flush().await {
                    tracing::warn!(error = %e, "NATS flush failed.");
                }
                let _ = done.send(());
            }
        }
    }
}

/// Who a subscription delivers to.
#[derive(Debug, Clone)]
enum Target {
    User(UserId),
    /// `ws.agent.<node>`: the scheduler's channel to the node's agent sockets.
    Agent(UserId),
    Room(RoomId),
    /// `ws.gw.<me>.push`: socket ids in the `ws-socket` header.
    Sockets,
    /// `ws.all`: every app socket.
    Broadcast,
    /// `ws.gw.<me>.ctl` and `ws.ctl`.
    Control,
    /// `ws.gw.<me>.probe`: our own liveness probes coming back.
    Probe,
}

/// Subscribes to a user's subject (`ws.user.<user>` for an app socket, `ws.agent.<node>`
/// for an agent) for as long as the returned handle lives.
pub fn subscribe_user(
    shared: &Arc<Shared>,
    subject: String,
    user: UserId,
    kind: ClientKind,
) -> Subscription {
    let target = match kind {
        ClientKind::App => Target::User(user),
        ClientKind::Agent => Target::Agent(user),
    };
    spawn_subscription(shared, subject, target)
}

/// Subscribes to a room's subject for as long as the returned handle lives.
pub fn subscribe_room(shared: &Arc<Shared>, subject: String, room: RoomId) -> Subscription {
    spawn_subscription(shared, subject, Target::Room(room))
}

/// Subscribes to this replica's fixed subjects: directed pushes, broadcast and control.
pub fn subscribe_fixed(shared: &Arc<Shared>) -> Vec<Subscription> {
    let me = &shared.config.instance;
    vec![
        spawn_subscription(shared, subject::gateway_push(me), Target::Sockets),
        spawn_subscription(shared, subject::broadcast().to_owned(), Target::Broadcast),
        spawn_subscription(shared, subject::gateway_control(me), Target::Control),
        spawn_subscription(shared, subject::control_all().to_owned(), Target::Control),
        spawn_subscription(shared, shared.bus.probe.subject.clone(), Target::Probe),
    ]
}

fn spawn_subscription(shared: &Arc<Shared>, subject: String, target: Target) -> Subscription {
    // A weak reference: a subscription must not keep the gateway's state alive.
    let weak = Arc::downgrade(shared);
    let client = shared.bus.client.clone();
    let probe = Arc::clone(&shared.bus.probe);
    let (live_tx, live) = watch::channel(false);
    let task = shared.bus.runtime.spawn(async move {
        let mut sub = match client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(%subject, error = %e, "Subscribing failed.");
                return;
            }
        };
        // Messages are read while the confirmation is pending (they queue otherwise).
        let confirm = probe.confirm();
        tokio::pin!(confirm);
        let mut confirmed = false;
        if let Target::Probe = target {
            // The probe subscription carries its own proof; nobody waits on it. The first
            // probe goes out only now, after this SUB.
            confirmed = true;
            let _ = live_tx.send(true);
            tokio::spawn(first_probe(Arc::clone(&probe)));
        }
        loop {
            tokio::select! {
                () = &mut confirm, if !confirmed => {
                    confirmed = true;
                    let _ = live_tx.send(true);
                }
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    let Some(shared) = weak.upgrade() else { break };
                    dispatch(&shared, &target, &msg);
                }
            }
        }
    });
    Subscription::new(task.abort_handle(), live)
}

/// A push ready for local recipients.
struct Push {
    /// The WebSocket message: header and push frame.
    frame: Bytes,
    exclude: Vec<SocketId>,
    /// Set when the sender asked for a receipt: the push id to report deliveries for.
    receipt: Option<u64>,
}

/// The push a bus message carries, with its recipients on `ws.gw.<gateway>.push`; `None`
/// (and counted) when it has expired or its headers are malformed.
fn build_push(shared: &Shared, msg: &async_nats::Message) -> Option<(Push, Vec<SocketId>)> {
    let recv_us = headers::now_micros();
    let map = msg.headers.as_ref();
    let envelope = match map.map(PushEnvelope::from_headers).transpose() {
        Ok(envelope) => envelope.unwrap_or_default(),
        Err(e) => {
            shared.metrics.pushes_invalid.inc();
            tracing::debug!(subject = %msg.subject, error = %e, "Dropped a malformed push.");
            return None;
        }
    };
    if envelope.expires_at_ms.is_some_and(|at| at < recv_us / 1000) {
        shared.metrics.pushes_expired.inc();
        return None;
    }
    let msg_id = envelope.msg_id;
    let flags = envelope.flags();
    // One span per bus message (not per socket): the delivery hop of the trace, whose
    // context travels on to the clients in the frame header.
    let hop = MessageSpan::start(
        Operation::Process,
        msg.subject.as_str(),
        msg_id,
        envelope.trace.as_ref(),
    );
    let trace = hop.context();
    if let Some(map) = map {
        shared
            .metrics
            .hops
            .record(map, headers::hop::GATEWAY_RECV, recv_us);
    }
    // The whole WebSocket message, built once: server frames are not masked, so every
    // recipient gets these same bytes.
    let len = encoded_len(trace.is_some(), envelope.route.len(), msg.payload.len());
    let mut buf = BytesMut::with_capacity(len + crate::ws::MAX_HEADER);
    crate::ws::put_binary_header(&mut buf, len);
    encode_parts(
        &mut buf,
        FrameKind::Push,
        flags,
        msg_id,
        trace.as_ref(),
        &envelope.route,
        &msg.payload,
    );
    let receipt = (flags.receipt() && msg_id != 0).then_some(msg_id);
    let push = Push {
        frame: buf.freeze(),
        exclude: envelope.exclude,
        receipt,
    };
    Some((push, envelope.sockets))
}

fn dispatch(shared: &Shared, target: &Target, msg: &async_nats::Message) {
    match target {
        Target::Control => return control(shared, msg),
        Target::Probe => return shared.bus.probe.received(&msg.payload),
        Target::Agent(node) => {
            if let Some(code) = agent_close(msg) {
                return close_agent(shared, node, code);
            }
        }
        _ => {}
    }
    let Some((push, sockets)) = build_push(shared, msg) else {
        return;
    };
    let mut delivered = 0u64;
    let limit = shared.config.outbound_queue;
    let mut deliver = |id: SocketId, conn: &ConnHandle| {
        if !push.exclude.contains(&id) {
            conn.push(push.frame.clone(), limit);
            delivered += 1;
        }
    };
    match target {
        Target::User(user) => {
            shared.registry.for_user(user, deliver);
        }
        Target::Agent(node) => {
            shared.registry.for_agent(node, deliver);
        }
        Target::Room(room) => {
            shared.registry.for_room(room, deliver);
        }
        Target::Broadcast => {
            shared.registry.for_all(Some(ClientKind::App), deliver);
        }
        Target::Sockets => {
            for id in sockets {
                if let Some(addr) = shared.registry.handle(id) {
                    deliver(id, &addr);
                }
            }
        }
        Target::Control | Target::Probe => {}
    }
    if let (Some(push_id), true) = (push.receipt, delivered > 0) {
        report_delivered(shared, push_id, delivered);
    }
}

/// The close code a message on `ws.agent.<node>` asks for, if it is a close rather than a
/// push (only the scheduler can publish there: NATS permissions).
fn agent_close(msg: &async_nats::Message) -> Option<CloseCode> {
    let map = msg.headers.as_ref()?;
    if !AgentClose::is_close(map) {
        return None;
    }
    // An instruction to close is obeyed even with a code this gateway does not know.
    Some(AgentClose::from_headers(map).map_or(CloseCode::Kicked, |close| close.code))
}

/// Closes every local agent socket of `node` (a revoked node).
fn close_agent(shared: &Shared, node: &UserId, code: CloseCode) {
    let closed = shared.registry.for_agent(node, |id, addr| {
        addr.do_send(ToConn::Control(GatewayControl::Close {
            socket_id: id,
            code: code.code(),
            reason: code.reason().to_owned(),
        }));
    });
    tracing::info!(%node, closed, code = code.code(), "Agent sockets closed by the scheduler.");
}

/// Tells the services how many local sockets a receipt-requesting push was handed to.
fn report_delivered(shared: &Shared, push_id: u64, count: u64) {
    let report = DeliveredEnvelope {
        push_id,
        count,
        gateway: shared.config.instance.clone(),
    };
    let out = Outbound::Publish {
        subject: subject::event(ClientKind::App, Event::Delivered),
        headers: report.to_headers(),
        payload: Bytes::new(),
        reply: None,
    };
    if shared.bus.send(out).is_err() {
        shared.metrics.publish_errors.inc();
    }
}

fn control(shared: &Shared, msg: &async_nats::Message) {
    let control: GatewayControl = match payload::from_bus(&msg.payload) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Undecodable gateway control message.");
            return;
        }
    };
    let socket = match &control {
        GatewayControl::Join { socket_id, .. }
        | GatewayControl::Leave { socket_id, .. }
        | GatewayControl::Refuse { socket_id, .. }
        | GatewayControl::Close { socket_id, .. } => Some(*socket_id),
        GatewayControl::Resync => None,
    };
    match socket {
        Some(id) => {
            if let Some(addr) = shared.registry.handle(id) {
                addr.do_send(ToConn::Control(control));
            }
        }
        None => resync(shared),
    }
}

/// Re-announces every local socket (a service lost its registry).
fn resync(shared: &Shared) {
    let mut count = 0;
    shared.registry.for_all(None, |_, addr| {
        addr.do_send(ToConn::Announce);
        count += 1;
    });
    tracing::info!(sockets = count, "Resync requested; re-announcing sessions.");
}

/// Sends last-seen batches every `period` until the returned task is aborted.
pub fn spawn_presence_sync(shared: &Arc<Shared>, period: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    shared.bus.runtime.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            sync_presence(&shared);
        }
    })
}

/// Publishes the sockets this replica holds, with the time it vouched for them. Every held
/// socket is included, not only those that sent something: a quiet client is still
/// connected (its heartbeat deadline is enforced here), and presence must not expire it.
pub fn sync_presence(shared: &Shared) {
    let now = now_ms();
    for kind in ClientKind::ALL {
        let mut held = Vec::new();
        shared
            .registry
            .for_all(Some(kind), |id, _| held.push((id, now)));
        for chunk in held.chunks(PRESENCE_CHUNK) {
            let batch = HeartbeatBatch {
                gateway: shared.config.instance.clone(),
                at_ms: now,
                seen: chunk.to_vec(),
            };
            let Ok(body) = payload::to_bus(&batch) else {
                continue;
            };
            let envelope = HeartbeatEnvelope {
                gateway: shared.config.instance.clone(),
            };
            let out = Outbound::Publish {
                subject: subject::event(kind, Event::Heartbeat),
                headers: envelope.to_headers(),
                payload: Bytes::from(body),
                reply: None,
            };
            if shared.bus.send(out).is_err() {
                shared.metrics.publish_errors.inc();
            }
        }
    }
}
