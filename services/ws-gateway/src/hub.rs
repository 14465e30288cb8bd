//! The hub: the one owner of this replica's interest and local fan-out. It keeps the
//! registry of local sockets (user, agent node, room, socket id), creates a user's, node's
//! or room's subscription on the interest link with its first local socket and drops it
//! with the last, and turns every bus message that arrives for a local recipient into
//! deliveries: one push encoded once as a complete WebSocket message, a reference-counted
//! clone of it for each recipient.
//!
//! Connections are reached through [`Member`], so the hub knows nothing of actors (and is
//! tested with plain values); the bus is reached through the publish function it is given
//! (delivery reports, presence batches), so it knows nothing of NATS either. Sessions call
//! the hub; the hub never calls a session's code, only its [`Member`] handle.

use bytes::{Bytes, BytesMut};
use messages::envelope::{AgentClose, DeliveredEnvelope, HeartbeatEnvelope, PushEnvelope};
use messages::frame::{Position, StreamRef, encode_parts, encode_positioned, encoded_len};
use messages::payload::{self, GatewayControl, HeartbeatBatch};
use messages::subject::{self, Event};
use messages::{ClientKind, CloseCode, FrameKind, GatewayId, RoomId, SocketId, UserId, headers};
use servicekit::clock::now_ms;
use servicekit::telemetry::{MessageSpan, Operation};
use std::sync::Arc;

use crate::bus::Outbound;
use crate::link::{Delivery, Fixed, Interest, Link, Live};
use crate::metrics::Metrics;
use crate::registry::{Registry, RoomsFull};
use crate::relay::Relays;

/// Entries per presence batch message (keeps each well under NATS' max payload).
const PRESENCE_CHUNK: usize = 2_000;

/// How the hub reaches one local connection.
pub trait Member: Clone {
    /// Hands over a push (a complete WebSocket message); at most `limit` may wait.
    fn push(&self, frame: Bytes, limit: usize);
    /// A service's instruction for this socket.
    fn control(&self, control: GatewayControl);
    /// Publish the connect event again (a service asked for a resync).
    fn announce(&self);
    /// A service's join for this socket was applied (`Ok`: whether it was newly added, and
    /// the room subscription's confirmation) or refused by the room cap.
    fn joined(&self, room: RoomId, msg_id: u64, outcome: Result<(bool, Live), RoomsFull>);
    /// A service's leave for this socket was applied.
    fn left(&self, room: RoomId, msg_id: u64);
    /// Whether this connection wants pushes from history streams with their position
    /// block (it connected with `positions=1`, ADR 0017).
    fn positions(&self) -> bool {
        false
    }
}

/// Hands a message to the bus publisher; false when it could not be queued.
pub(crate) type Publish = Box<dyn Fn(Outbound) -> bool + Send + Sync>;

/// See the module documentation.
pub struct Hub<H> {
    registry: Registry<H>,
    link: Arc<Link>,
    instance: GatewayId,
    /// Pushes one connection may have waiting.
    outbound_queue: usize,
    /// Rooms one socket may be in.
    max_rooms: usize,
    metrics: Arc<Metrics>,
    publish: Publish,
    /// Relay connections, closed with their node.
    relays: Relays,
}

impl<H> std::fmt::Debug for Hub<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("instance", &self.instance)
            .field("subscriptions", &self.link.len())
            .finish_non_exhaustive()
    }
}

impl<H: Member> Hub<H> {
    /// A hub subscribing on `link` and publishing through `publish`.
    pub fn new(
        link: Arc<Link>,
        instance: GatewayId,
        outbound_queue: usize,
        max_rooms: usize,
        metrics: Arc<Metrics>,
        publish: Publish,
    ) -> Self {
        Hub {
            registry: Registry::new(),
            link,
            instance,
            outbound_queue,
            max_rooms,
            metrics,
            publish,
            relays: Relays::default(),
        }
    }

    /// The relay connections held here, which [`Hub`] closes with their node.
    pub fn relays(&self) -> &Relays {
        &self.relays
    }

    /// The interest link (readiness, diagnostics).
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Registers a connection; the user's (or node's) subscription is created with its
    /// first local socket. The returned [`Live`] resolves once that subscription is
    /// confirmed: only then may the session promise its client every later push.
    pub fn add(&self, id: SocketId, user: &UserId, kind: ClientKind, member: H) -> Live {
        self.registry.add(id, user, kind, member, |interest| {
            self.link.subscribe(interest)
        })
    }

    /// Removes a connection and its room memberships; subscriptions nobody local needs
    /// any more are dropped (unsubscribed).
    pub fn remove(&self, id: SocketId, user: &UserId, rooms: &[RoomId]) {
        self.registry.remove(id, user, rooms);
    }

    /// Adds a socket to a room (subscribing with the room's first local member). `None`
    /// if the socket is not connected here; else whether it was newly added, and the room
    /// subscription's confirmation.
    pub fn join(&self, id: SocketId, room: &RoomId) -> Option<(bool, Live)> {
        self.registry
            .join(id, room, |interest| self.link.subscribe(interest))
    }

    /// Removes a socket from a room; whether it was a member.
    pub fn leave(&self, id: SocketId, room: &RoomId) -> bool {
        self.registry.leave(id, room)
    }

    /// Calls `f` for every local socket of `kind` (all when `None`); returns how many.
    pub fn for_all(&self, kind: Option<ClientKind>, f: impl FnMut(SocketId, &H)) -> usize {
        self.registry.for_all(kind, f)
    }

    /// Connected sockets.
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    /// Whether no socket is connected.
    pub fn is_empty(&self) -> bool {
        self.registry.is_empty()
    }

    /// A message for a user, agent node or room this replica is interested in, or on one
    /// of its fixed subjects.
    pub fn on_interest(&self, interest: &Interest, delivery: &Delivery) {
        if let Interest::Fixed(fixed, _) = interest {
            return self.on_fixed(*fixed, delivery);
        }
        if let Interest::Agent(node) = interest
            && let Some(code) = agent_close(delivery)
        {
            return self.close_agent(node, code);
        }
        let stream = match interest {
            Interest::User(_) => Some(StreamRef::User),
            Interest::Room(room) => Some(StreamRef::Room(room.clone())),
            _ => None,
        };
        let Some((push, _)) = self.build_push(delivery, stream) else {
            return;
        };
        let mut delivered = 0u64;
        let mut deliver = |id: SocketId, member: &H| {
            if !push.exclude.contains(&id) {
                let frame = match &push.positioned {
                    Some(positioned) if member.positions() => positioned,
                    _ => &push.frame,
                };
                member.push(frame.clone(), self.outbound_queue);
                delivered += 1;
            }
        };
        match interest {
            Interest::User(user) => self.registry.for_user(user, &mut deliver),
            Interest::Agent(node) => self.registry.for_agent(node, &mut deliver),
            Interest::Room(room) => self.registry.for_room(room, &mut deliver),
            Interest::Fixed(..) => 0,
        };
        self.report(&push, delivered);
    }

    /// A message on one of the replica's fixed subjects.
    fn on_fixed(&self, fixed: Fixed, delivery: &Delivery) {
        match fixed {
            Fixed::Control => return self.control(delivery),
            Fixed::Sockets | Fixed::Broadcast => {}
        }
        let Some((push, sockets)) = self.build_push(delivery, None) else {
            return;
        };
        let mut delivered = 0u64;
        let mut deliver = |id: SocketId, member: &H| {
            if !push.exclude.contains(&id) {
                member.push(push.frame.clone(), self.outbound_queue);
                delivered += 1;
            }
        };
        match fixed {
            Fixed::Broadcast => {
                self.registry.for_all(Some(ClientKind::App), &mut deliver);
            }
            Fixed::Sockets => {
                for id in sockets {
                    if let Some(member) = self.registry.handle(id) {
                        deliver(id, &member);
                    }
                }
            }
            Fixed::Control => {}
        }
        self.report(&push, delivered);
    }

    /// The push a bus message carries, with its recipients on `ws.gw.<gateway>.push`;
    /// `None` (and counted) when it has expired or its headers are malformed. A push from a
    /// history `stream` (it carries a position) is also encoded with its position block,
    /// once, for the connections that asked for positions.
    fn build_push(
        &self,
        msg: &Delivery,
        stream: Option<StreamRef>,
    ) -> Option<(Push, Vec<SocketId>)> {
        let recv_us = headers::now_micros();
        let map = msg.headers.as_ref();
        let envelope = match map.map(PushEnvelope::from_headers).transpose() {
            Ok(envelope) => envelope.unwrap_or_default(),
            Err(e) => {
                self.metrics.pushes_invalid.inc();
                tracing::debug!(subject = %msg.subject, error = %e, "Dropped a malformed push.");
                return None;
            }
        };
        if envelope.expires_at_ms.is_some_and(|at| at < recv_us / 1000) {
            self.metrics.pushes_expired.inc();
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
            self.metrics
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
        let positioned = match (stream, envelope.position) {
            (Some(stream), Some((epoch, offset))) => {
                let position = Position {
                    stream,
                    epoch,
                    offset,
                };
                let len = len + position.wire_len();
                let mut buf = BytesMut::with_capacity(len + crate::ws::MAX_HEADER);
                crate::ws::put_binary_header(&mut buf, len);
                encode_positioned(
                    &mut buf,
                    FrameKind::Push,
                    flags,
                    msg_id,
                    trace.as_ref(),
                    Some(&position),
                    &envelope.route,
                    &msg.payload,
                );
                Some(buf.freeze())
            }
            _ => None,
        };
        let push = Push {
            positioned,
            frame: buf.freeze(),
            exclude: envelope.exclude,
            receipt,
        };
        Some((push, envelope.sockets))
    }

    /// Tells the services how many local sockets a receipt-requesting push was handed to.
    fn report(&self, push: &Push, delivered: u64) {
        let Some(push_id) = push.receipt else { return };
        if delivered == 0 {
            return;
        }
        let report = DeliveredEnvelope {
            push_id,
            count: delivered,
            gateway: self.instance.clone(),
        };
        let out = Outbound::Publish {
            subject: subject::event(ClientKind::App, Event::Delivered),
            headers: report.to_headers(),
            payload: Bytes::new(),
            reply: None,
        };
        if !(self.publish)(out) {
            self.metrics.publish_errors.inc();
        }
    }

    /// Closes every local agent socket of `node` (a revoked node).
    fn close_agent(&self, node: &UserId, code: CloseCode) {
        let closed = self.registry.for_agent(node, |id, member| {
            member.control(GatewayControl::Close {
                socket_id: id,
                code: code.code(),
                reason: code.reason().to_owned(),
            });
        });
        let relays = self.relays.close(node, code);
        tracing::info!(%node, closed, relays, code = code.code(), "Agent sockets closed by the scheduler.");
    }

    fn control(&self, msg: &Delivery) {
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
            GatewayControl::Resync { sockets } => {
                // Named sockets: app sockets only, as for every control naming a socket.
                self.resync(sockets);
                return;
            }
        };
        let Some(member) = socket.and_then(|id| self.registry.handle(id)) else {
            return;
        };
        // Memberships change here, in the bus's order, not later in the connection's
        // actor: a room push a service sends right after its join reaches the socket.
        match control {
            GatewayControl::Join {
                socket_id,
                room,
                msg_id,
            } => {
                let outcome =
                    self.registry
                        .join_within(socket_id, &room, self.max_rooms, |interest| {
                            self.link.subscribe(interest)
                        });
                if let Some(outcome) = outcome {
                    member.joined(room, msg_id, outcome);
                }
            }
            GatewayControl::Leave {
                socket_id,
                room,
                msg_id,
            } => {
                self.registry.leave(socket_id, &room);
                member.left(room, msg_id);
            }
            other => member.control(other),
        }
    }

    /// A service asked for connect events again: for every local socket (it lost its
    /// registry), or for the listed ones this replica still holds (it found them in a
    /// last-seen batch without a record; a socket that has gone since is not announced, so
    /// a resync never brings back a closed session).
    fn resync(&self, sockets: &[SocketId]) {
        if sockets.is_empty() {
            let count = self.registry.for_all(None, |_, member| member.announce());
            tracing::info!(sockets = count, "Resync requested; re-announcing sessions.");
            return;
        }
        let mut count = 0usize;
        for member in sockets.iter().filter_map(|id| self.registry.handle(*id)) {
            member.announce();
            count += 1;
        }
        tracing::info!(
            asked = sockets.len(),
            sockets = count,
            "Resync of named sockets requested; re-announcing those still held."
        );
    }

    /// Publishes the sockets this replica holds, with the time it vouched for them. Every
    /// held socket is included, not only those that sent something: a quiet client is still
    /// connected (its heartbeat deadline is enforced here), and presence must not expire it.
    pub fn sync_presence(&self) {
        let now = now_ms();
        for kind in ClientKind::ALL {
            let mut held = Vec::new();
            self.registry
                .for_all(Some(kind), |id, _| held.push((id, now)));
            for chunk in held.chunks(PRESENCE_CHUNK) {
                let batch = HeartbeatBatch {
                    gateway: self.instance.clone(),
                    at_ms: now,
                    seen: chunk.to_vec(),
                };
                let Ok(body) = payload::to_bus(&batch) else {
                    continue;
                };
                let envelope = HeartbeatEnvelope {
                    gateway: self.instance.clone(),
                };
                let out = Outbound::Publish {
                    subject: subject::event(kind, Event::Heartbeat),
                    headers: envelope.to_headers(),
                    payload: Bytes::from(body),
                    reply: None,
                };
                if !(self.publish)(out) {
                    self.metrics.publish_errors.inc();
                }
            }
        }
    }
}

/// A push ready for local recipients.
struct Push {
    /// The WebSocket message: header and push frame.
    frame: Bytes,
    /// The same with the position block, for a push from a history stream.
    positioned: Option<Bytes>,
    exclude: Vec<SocketId>,
    /// Set when the sender asked for a receipt: the push id to report deliveries for.
    receipt: Option<u64>,
}

/// The close code a message on `ws.agent.<node>` asks for, if it is a close rather than a
/// push (only the scheduler can publish there: NATS permissions).
fn agent_close(msg: &Delivery) -> Option<CloseCode> {
    let map = msg.headers.as_ref()?;
    if !AgentClose::is_close(map) {
        return None;
    }
    // An instruction to close is obeyed even with a code this gateway does not know.
    Some(AgentClose::from_headers(map).map_or(CloseCode::Kicked, |close| close.code))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;
    use std::time::Duration;

    use messages::envelope::PushEnvelope;
    use messages::{BodyCodec, Route};

    use super::*;

    /// A connection as the hub sees it: records what it was handed.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Vec<String>>>);

    impl Member for Fake {
        fn push(&self, frame: Bytes, limit: usize) {
            self.0
                .lock()
                .unwrap()
                .push(format!("push {} {limit}", frame.len()));
        }
        fn control(&self, control: GatewayControl) {
            self.0.lock().unwrap().push(format!("control {control:?}"));
        }
        fn announce(&self) {
            self.0.lock().unwrap().push("announce".into());
        }
        fn joined(&self, room: RoomId, msg_id: u64, outcome: Result<(bool, Live), RoomsFull>) {
            let outcome = outcome.map(|(added, _)| added);
            self.0
                .lock()
                .unwrap()
                .push(format!("joined {room} {msg_id} {outcome:?}"));
        }
        fn left(&self, room: RoomId, msg_id: u64) {
            self.0.lock().unwrap().push(format!("left {room} {msg_id}"));
        }
    }

    impl Fake {
        fn seen(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn hub() -> (Hub<Fake>, Arc<Link>, Arc<Mutex<Vec<Outbound>>>) {
        let link = Link::new();
        link.set_connected();
        let published = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&published);
        let hub = Hub::new(
            Arc::clone(&link),
            GatewayId::new("gw-test").unwrap(),
            8,
            2,
            Arc::new(Metrics::new()),
            Box::new(move |out| {
                sink.lock().unwrap().push(out);
                true
            }),
        );
        (hub, link, published)
    }

    fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }

    fn push(msg_id: u64, exclude: &[SocketId], receipt: bool) -> Delivery {
        let mut envelope = PushEnvelope::new(msg_id, Route::empty(), BodyCodec::Raw);
        envelope.exclude = exclude.to_vec();
        if receipt {
            envelope.receipt = true;
        }
        Delivery {
            subject: subject::user(&user("x")),
            headers: Some(envelope.to_headers()),
            payload: Bytes::from_static(b"body"),
        }
    }

    #[tokio::test]
    async fn one_subscription_per_user_made_with_the_first_socket_dropped_with_the_last() {
        let (hub, link, _) = hub();
        let (a, b) = (Fake::default(), Fake::default());
        let live = hub.add(SocketId(1), &user("ada"), ClientKind::App, a);
        hub.add(SocketId(2), &user("ada"), ClientKind::App, b);
        assert_eq!(
            link.queued(),
            format!("SUB {} 1\r\n", subject::user(&user("ada"))),
            "one SUB for two sockets"
        );
        // Not live until the link confirms it: a welcome must wait.
        let waiting = live;
        link.confirm_all();
        assert!(waiting.wait(Duration::from_millis(10)).await);
        hub.remove(SocketId(1), &user("ada"), &[]);
        assert_eq!(link.len(), 1, "the other socket still needs it");
        hub.remove(SocketId(2), &user("ada"), &[]);
        assert!(link.is_empty());
        assert!(link.queued().ends_with("UNSUB 1\r\n"), "{}", link.queued());
    }

    #[tokio::test]
    async fn a_subscription_is_not_live_before_the_link_confirms_it() {
        let (hub, _link, _) = hub();
        let live = hub.add(SocketId(1), &user("bo"), ClientKind::App, Fake::default());
        assert!(!live.wait(Duration::from_millis(20)).await);
    }

    #[test]
    fn a_user_push_is_encoded_once_and_reaches_every_socket_but_the_excluded() {
        let (hub, _, published) = hub();
        let (a, b, other) = (Fake::default(), Fake::default(), Fake::default());
        hub.add(SocketId(1), &user("ada"), ClientKind::App, a.clone());
        hub.add(SocketId(2), &user("ada"), ClientKind::App, b.clone());
        hub.add(SocketId(3), &user("cy"), ClientKind::App, other.clone());
        hub.on_interest(&Interest::User(user("ada")), &push(5, &[SocketId(2)], true));
        let sent = a.seen();
        assert_eq!(sent.len(), 1);
        assert!(
            sent[0].ends_with(" 8"),
            "the queue limit travels with the push: {sent:?}"
        );
        assert!(b.seen().is_empty(), "excluded");
        assert!(other.seen().is_empty(), "another user");
        // The receipt counts the one delivery.
        let published = published.lock().unwrap();
        assert_eq!(published.len(), 1);
        let Outbound::Publish { headers, .. } = &published[0] else {
            panic!()
        };
        let report = DeliveredEnvelope::from_headers(headers).unwrap();
        assert_eq!((report.push_id, report.count), (5, 1));
    }

    #[test]
    fn an_app_user_push_never_reaches_an_agent_with_the_same_id_and_broadcast_skips_agents() {
        let (hub, _, _) = hub();
        let (app, agent) = (Fake::default(), Fake::default());
        hub.add(SocketId(1), &user("edge"), ClientKind::App, app.clone());
        hub.add(SocketId(2), &user("edge"), ClientKind::Agent, agent.clone());
        hub.on_interest(&Interest::User(user("edge")), &push(1, &[], false));
        let broadcast = Interest::Fixed(Fixed::Broadcast, subject::broadcast().to_owned());
        hub.on_interest(&broadcast, &push(2, &[], false));
        assert_eq!(app.seen().len(), 2);
        assert!(agent.seen().is_empty());
        hub.on_interest(&Interest::Agent(user("edge")), &push(3, &[], false));
        assert_eq!(agent.seen().len(), 1);
    }

    #[test]
    fn room_members_share_one_subscription_and_a_leave_stops_their_pushes() {
        let (hub, link, _) = hub();
        let (a, b) = (Fake::default(), Fake::default());
        hub.add(SocketId(1), &user("a"), ClientKind::App, a.clone());
        hub.add(SocketId(2), &user("b"), ClientKind::App, b.clone());
        let lobby = RoomId::new("chat.lobby").unwrap();
        assert!(
            hub.join(SocketId(1), &lobby)
                .is_some_and(|(added, _)| added)
        );
        assert!(
            hub.join(SocketId(2), &lobby)
                .is_some_and(|(added, _)| added)
        );
        let sub = format!("SUB {} ", subject::room(&lobby));
        assert_eq!(link.queued().matches(&sub).count(), 1);
        assert!(
            hub.join(SocketId(99), &lobby).is_none(),
            "not connected here"
        );
        assert!(hub.leave(SocketId(1), &lobby));
        hub.on_interest(&Interest::Room(lobby.clone()), &push(1, &[], false));
        assert!(a.seen().is_empty());
        assert_eq!(b.seen().len(), 1);
        hub.remove(SocketId(2), &user("b"), std::slice::from_ref(&lobby));
        assert!(
            link.queued().contains("UNSUB"),
            "last member gone: {}",
            link.queued()
        );
    }

    fn control_msg(hub: &Hub<Fake>, control: &GatewayControl) -> (Interest, Delivery) {
        let me = subject::gateway_control(&hub.instance);
        let delivery = Delivery {
            subject: me.clone(),
            headers: None,
            payload: Bytes::from(payload::to_bus(control).unwrap()),
        };
        (Interest::Fixed(Fixed::Control, me), delivery)
    }

    #[test]
    fn a_services_join_takes_effect_before_the_next_bus_message_and_respects_the_cap() {
        let (hub, _, _) = hub();
        let a = Fake::default();
        hub.add(SocketId(1), &user("a"), ClientKind::App, a.clone());
        let room = |s: &str| RoomId::new(s).unwrap();
        for (name, msg_id) in [("r1", 0), ("r2", 5), ("r3", 6)] {
            let join = GatewayControl::Join {
                socket_id: SocketId(1),
                room: room(name),
                msg_id,
            };
            let (interest, delivery) = control_msg(&hub, &join);
            hub.on_interest(&interest, &delivery);
        }
        // A room push right behind the join reaches the socket: the membership changed
        // when the hub read the join, not when the connection got round to it.
        hub.on_interest(&Interest::Room(room("r1")), &push(9, &[], false));
        assert_eq!(
            a.seen(),
            [
                "joined r1 0 Ok(true)".to_owned(),
                "joined r2 5 Ok(true)".to_owned(),
                "joined r3 6 Err(RoomsFull)".to_owned(),
                "push 18 8".to_owned(),
            ],
            "the third room is over the cap of 2"
        );
        let leave = GatewayControl::Leave {
            socket_id: SocketId(1),
            room: room("r1"),
            msg_id: 7,
        };
        let (interest, delivery) = control_msg(&hub, &leave);
        hub.on_interest(&interest, &delivery);
        hub.on_interest(&Interest::Room(room("r1")), &push(10, &[], false));
        assert_eq!(a.seen(), ["left r1 7"], "no push after the leave");
    }

    #[test]
    fn an_expired_push_is_dropped_and_a_malformed_one_counted() {
        let (hub, _, published) = hub();
        let a = Fake::default();
        hub.add(SocketId(1), &user("ada"), ClientKind::App, a.clone());
        let mut envelope = PushEnvelope::new(1, Route::empty(), BodyCodec::Raw);
        envelope.expires_at_ms = Some(1);
        let expired = Delivery {
            subject: subject::user(&user("ada")),
            headers: Some(envelope.to_headers()),
            payload: Bytes::new(),
        };
        hub.on_interest(&Interest::User(user("ada")), &expired);
        assert!(a.seen().is_empty());
        assert_eq!(hub.metrics.pushes_expired.get(), 1);
        assert!(published.lock().unwrap().is_empty());
    }

    #[test]
    fn control_reaches_its_socket_and_a_resync_every_socket() {
        let (hub, _, _) = hub();
        let (a, b) = (Fake::default(), Fake::default());
        hub.add(SocketId(1), &user("a"), ClientKind::App, a.clone());
        hub.add(SocketId(2), &user("b"), ClientKind::Agent, b.clone());
        let close = GatewayControl::Close {
            socket_id: SocketId(1),
            code: 4503,
            reason: "bye".into(),
        };
        let body = payload::to_bus(&close).unwrap();
        let msg = |body: Vec<u8>| Delivery {
            subject: subject::gateway_control(&hub.instance),
            headers: None,
            payload: Bytes::from(body),
        };
        let ctl = Interest::Fixed(Fixed::Control, subject::control_all().to_owned());
        hub.on_interest(&ctl, &msg(body));
        assert_eq!(a.seen().len(), 1);
        hub.on_interest(
            &ctl,
            &msg(payload::to_bus(&GatewayControl::Resync { sockets: vec![] }).unwrap()),
        );
        assert_eq!(a.seen(), ["announce"]);
        assert_eq!(b.seen(), ["announce"]);
    }

    #[test]
    fn a_resync_of_named_sockets_announces_only_the_app_sockets_still_held() {
        let (hub, _, _) = hub();
        let (a, b, c) = (Fake::default(), Fake::default(), Fake::default());
        hub.add(SocketId(1), &user("a"), ClientKind::App, a.clone());
        hub.add(SocketId(2), &user("b"), ClientKind::App, b.clone());
        hub.add(SocketId(3), &user("edge-1"), ClientKind::Agent, c.clone());
        let resync = GatewayControl::Resync {
            // 9 has gone: nothing brings a closed session back.
            sockets: vec![SocketId(2), SocketId(3), SocketId(9)],
        };
        let (interest, delivery) = control_msg(&hub, &resync);
        hub.on_interest(&interest, &delivery);
        assert!(a.seen().is_empty(), "not named");
        assert_eq!(b.seen(), ["announce"]);
        assert!(c.seen().is_empty(), "agents are not addressed by socket id");
    }
}
