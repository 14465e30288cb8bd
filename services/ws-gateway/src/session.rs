//! The per-connection actor: one `Conn` per WebSocket. It owns the write half
//! (`transport::Sink`), receives the read half as a stream of WebSocket messages
//! (`transport::Reader`), runs the heartbeat deadline and the rate limit, turns client
//! frames into bus messages, and writes pushes through a bounded outbound queue. The rules
//! it applies live apart, each tested without an actor: the queue and the inbox in
//! `outbox.rs`, the bus messages a frame becomes in `upstream.rs`, the heartbeat in
//! `heartbeat.rs`, the frame rate in [`RateLimit`]; the actor decides when, and runs the
//! writer and the close.
//!
//! The queue holds complete WebSocket messages: a push arrives encoded once for all its
//! recipients and is written as it is. Writes never block the actor: everything queued is
//! handed to one writer future at a time (`ctx.spawn`), as one vectored write where the
//! socket takes it, so the mailbox keeps flowing while a client is slow. The queue is
//! taken whole by the writer, so an idle connection keeps no queue memory after a burst.
//! When the queue passes its limit, or a write stalls past the write timeout, the client is
//! closed as a slow consumer; nobody else waits for it. Closing uses `ctx.wait` with a
//! deadline, and the actor stops only after the close frame was written (see
//! docs/dependencies.md, traps 1-3).
//!
//! The session rules docs/protocol.md states live here: every decoder error (and every
//! text message) is answered with an error frame carrying message id 0 and closes the
//! connection with the error's close code; message id 0 asks for no ack; WebSocket pings
//! take a token from the frame rate limit, do not count as session activity, and are
//! answered by one pong for the latest ping, so a ping flood cannot queue pongs.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    ActorContext, ActorFutureExt, AsyncContext, Handler, Message, SpawnHandle, StreamHandler,
    WrapFuture,
};
use async_nats::HeaderMap;
use bytes::Bytes;
use messages::envelope::{ClientOp, Origin, SessionEnvelope};
use messages::frame::StreamRef;
use messages::payload::{self, ErrorBody, GatewayControl, HeartbeatAck, JoinSince, Reconnect};
use messages::subject::{self, Event};
use messages::{
    BodyCodec, ClientKind, CloseCode, ErrorCode, Frame, FrameError, FrameKind, RoomId, SocketId,
    UserId,
};
use servicekit::clock::now_ms;

use crate::Shared;
use crate::admission::Ticket;
use crate::bus::{Outbound, PublishOutcome};
use crate::heartbeat::{Beat, Heartbeat};
use crate::history::{self, Recovering};
use crate::hub::Member;
use crate::link::Live;
use crate::outbox::{Batch, Inbox, Outbox};
use crate::registry::RoomsFull;
use crate::transport::Sink;
use crate::upstream;
use crate::ws::{self, Message as WsMessage, WsError};

/// How long a new session or a join waits for its subscription before going ahead anyway.
const LIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection may spend writing what is queued and the close frame.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// How the bus side reaches a connection: its actor's address, and its inbox for pushes.
///
/// A push does not travel as an actor message: the fan-out appends the shared bytes to the
/// connection's inbox and wakes the actor only if it is not already due to drain it, so a
/// burst of pushes costs one queue slot per delivery instead of one mailbox envelope, and
/// one wake-up per batch instead of one per push.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    addr: actix::Addr<Conn>,
    inbox: Arc<Inbox>,
    /// The connection asked for position blocks (ADR 0017).
    positions: bool,
}

impl ConnHandle {
    /// Sends an actor message.
    pub fn do_send(&self, msg: ToConn) {
        self.addr.do_send(msg);
    }
}

impl Member for ConnHandle {
    fn control(&self, control: GatewayControl) {
        self.addr.do_send(ToConn::Control(control));
    }

    fn announce(&self) {
        self.addr.do_send(ToConn::Announce);
    }

    fn joined(&self, room: RoomId, msg_id: u64, outcome: Result<(bool, Live), RoomsFull>) {
        self.addr.do_send(ToConn::Joined {
            room,
            msg_id,
            outcome,
        });
    }

    fn left(&self, room: RoomId, msg_id: u64) {
        self.addr.do_send(ToConn::Left { room, msg_id });
    }

    fn positions(&self) -> bool {
        self.positions
    }

    /// Hands a push (a complete WebSocket message) to the connection. At most `limit`
    /// pushes wait in the inbox; past that the connection is closed as a slow consumer.
    fn push(&self, frame: Bytes, limit: usize) {
        if self.inbox.offer(frame, limit) {
            self.addr.do_send(ToConn::Drain);
        }
    }
}

/// Something for a connection to do, sent by the bus side or the gateway.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum ToConn {
    /// Pushes are waiting in the inbox.
    Drain,
    /// A service's instruction for this socket.
    Control(GatewayControl),
    /// A service's join, applied by the hub.
    Joined {
        /// The room.
        room: RoomId,
        /// The client's request id (0: the service's own initiative).
        msg_id: u64,
        /// Applied (newly added?, confirmation) or refused by the room cap.
        outcome: Result<(bool, Live), RoomsFull>,
    },
    /// A service's leave, applied by the hub.
    Left {
        /// The room.
        room: RoomId,
        /// The client's request id.
        msg_id: u64,
    },
    /// The gateway is draining: tell the client to reconnect after `delay`, close then.
    Reconnect {
        /// When to close, if the client has not gone by then.
        delay: Duration,
        /// The close code then: `Shutdown` for a drain, `NotReady` when the bus is gone.
        code: CloseCode,
        /// Said in the reconnect frame.
        reason: &'static str,
    },
    /// Publish this session's connect event again (a service asked for a resync).
    Announce,
}

/// Token bucket for the per-connection frame rate.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full bucket of `burst` tokens refilling at `rate` per second.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            tokens: burst,
            rate: f64::from(rate),
            burst,
            last: now,
        }
    }

    /// Whether the bucket would be full at `now` (the client has stayed within its rate
    /// long enough to have its whole burst back).
    pub(crate) fn full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The frame rate rule: a message without a token is dropped (a strike), and more than
/// `burst` strikes close the connection with 4004. The strikes are cleared once the bucket
/// is full again, not by the next message that gets a token: a client flooding at several
/// times its rate gets a token at every refill, and clearing on that would let it flood
/// forever (the hostile-clients run of issue 18 found a 300-per-second ping flood never
/// cut at 50 per second).
#[derive(Debug, Clone)]
pub(crate) struct RateLimit {
    bucket: TokenBucket,
    strikes: u32,
    burst: u32,
}

impl RateLimit {
    /// `rate` messages per second with bursts of `burst`.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        RateLimit {
            bucket: TokenBucket::new(rate, burst, now),
            strikes: 0,
            burst,
        }
    }

    /// What the rule says about a message arriving at `now`.
    fn admit(&mut self, now: Instant) -> Admit {
        if self.bucket.full_at(now) {
            self.strikes = 0;
        }
        if self.bucket.take(now) {
            return Admit::Go;
        }
        self.strikes = self.strikes.saturating_add(1);
        if self.strikes > self.burst {
            Admit::Closed
        } else {
            Admit::Dropped
        }
    }
}

/// Identity and wiring a new connection starts with.
pub(crate) struct ConnInit {
    /// Minted socket id.
    pub id: SocketId,
    /// Token subject.
    pub user: UserId,
    /// Client kind.
    pub kind: ClientKind,
    /// Rooms the token allows (forwarded in the connect event).
    pub allowed_rooms: Vec<RoomId>,
    /// Unix seconds when the token expires; the connection is closed then.
    pub expires_at: u64,
    /// Codec for the gateway's own control bodies.
    pub codec: BodyCodec,
    /// Write half of the upgraded socket.
    pub sink: Sink,
    /// Replica-wide state.
    pub shared: Arc<Shared>,
    /// The admission slot this connection holds until it ends.
    pub ticket: Ticket,
    /// Positions and user-stream recovery asked for at connect (ADR 0017).
    pub recovery: history::ConnRecovery,
    /// The relay agent whose connection carries this one (ADR 0015), if any.
    pub via: Option<UserId>,
}

/// One WebSocket connection.
pub(crate) struct Conn {
    id: SocketId,
    user: UserId,
    kind: ClientKind,
    /// Sent in the connect event (and again on a resync).
    allowed_rooms: Vec<RoomId>,
    /// The relay this connection arrived through, named in its session events.
    via: Option<UserId>,
    /// Unix seconds when the credential expires.
    expires_at: u64,
    codec: BodyCodec,
    /// Shared by the writer futures and the close; at most one holds it at a time.
    sink: Rc<tokio::sync::Mutex<Sink>>,
    shared: Arc<Shared>,
    hb: Heartbeat,
    /// Frames per second, and strikes for frames over it.
    rate: RateLimit,
    /// Rooms this socket is in here (to clean up on disconnect, and in a re-announce).
    rooms: Vec<RoomId>,
    /// Unix ms of the first connect event; set once it is published, so every later one
    /// is a re-announce that carries it and the rooms.
    announced_at_ms: Option<u64>,
    /// Join/leave requests forwarded to the services and not answered yet: message id and
    /// whether it is a join (pending joins count against the room cap).
    pending: Vec<(u64, bool)>,
    /// WebSocket messages waiting for the writer, and its rules.
    outbox: Outbox,
    /// The writer future, if one runs.
    writer: Option<SpawnHandle>,
    /// Set once a close has started; the code goes into the disconnect event.
    closing: Option<CloseCode>,
    /// The close frame's reason when it is not the code's own (a service's close).
    close_reason: Option<String>,
    /// The close frame has been handed to the session.
    close_sent: bool,
    /// Why the peer went away, when it closed first.
    peer_reason: Option<String>,
    /// Pushes handed over by the fan-out.
    inbox: Arc<Inbox>,
    /// Positions and recovery (ADR 0017).
    recovery: Recovering,
    /// Held for the connection's lifetime; dropping it frees the admission slot.
    _ticket: Ticket,
}

impl std::fmt::Debug for ConnInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInit")
            .field("id", &self.id)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("user", &self.user)
            .field("kind", &self.kind)
            .field("queued", &self.outbox.len())
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A connection that will send its welcome as soon as it starts.
    pub(crate) fn new(init: ConnInit) -> Self {
        let now = Instant::now();
        let config = &init.shared.config;
        Conn {
            hb: Heartbeat::new(config.heartbeat, now),
            rate: RateLimit::new(config.rate_per_sec, config.rate_burst, now),
            outbox: Outbox::new(config.outbound_queue),
            id: init.id,
            user: init.user,
            kind: init.kind,
            allowed_rooms: init.allowed_rooms,
            via: init.via,
            expires_at: init.expires_at,
            codec: init.codec,
            sink: Rc::new(tokio::sync::Mutex::new(init.sink)),
            shared: init.shared,
            rooms: Vec::new(),
            announced_at_ms: None,
            pending: Vec::new(),
            writer: None,
            closing: None,
            close_reason: None,
            close_sent: false,
            peer_reason: None,
            inbox: Arc::default(),
            recovery: Recovering::new(init.recovery),
            _ticket: init.ticket,
        }
    }

    /// How the bus side reaches this connection.
    fn conn_handle(&self, ctx: &Ctx) -> ConnHandle {
        ConnHandle {
            addr: ctx.address(),
            inbox: Arc::clone(&self.inbox),
            positions: self.recovery.conn.positions,
        }
    }

    /// Moves the inbox's pushes to the outbound queue (closing a slow consumer).
    fn drain_inbox(&mut self, ctx: &mut Ctx) {
        let Ok(pushes) = self.inbox.take() else {
            return self.close(CloseCode::SlowConsumer, ctx);
        };
        if self.closing.is_some() || pushes.is_empty() {
            return;
        }
        // While a replay runs, live pushes wait behind it (ADR 0017).
        let Some(pushes) = self
            .recovery
            .admit(pushes, self.shared.config.outbound_queue)
        else {
            return self.close(CloseCode::SlowConsumer, ctx);
        };
        if pushes.is_empty() {
            return;
        }
        self.shared
            .metrics
            .pushes_delivered
            .inc_by(pushes.len() as u64);
        if self.outbox.extend(pushes).is_err() {
            return self.close(CloseCode::SlowConsumer, ctx);
        }
        self.pump(ctx);
    }

    /// A frame of the gateway's own, as a WebSocket message.
    fn control_frame<T: serde::Serialize>(&self, kind: FrameKind, msg_id: u64, body: &T) -> Bytes {
        let codec = match self.codec {
            BodyCodec::Raw => BodyCodec::MsgPack,
            c => c,
        };
        // Our own bodies always serialise; an empty body is the fallback if one did not.
        let body = payload::encode_body(codec, body).unwrap_or_default();
        let frame = Frame::new(kind)
            .with_msg_id(msg_id)
            .with_body(codec, body)
            .encode();
        ws::binary(&frame)
    }

    /// Acknowledges the client's frame `msg_id`: an empty body (codec raw), as the protocol
    /// says. Id 0 asks for no acknowledgement, so none is sent.
    fn send_ack(&mut self, msg_id: u64, ctx: &mut Ctx) {
        if msg_id != 0 {
            let frame = Frame::new(FrameKind::Ack).with_msg_id(msg_id).encode();
            self.enqueue(ws::binary(&frame), ctx);
        }
    }

    fn send_error(&mut self, msg_id: u64, code: ErrorCode, message: String, ctx: &mut Ctx) {
        // A join that asked for recovery and failed holds live pushes no longer.
        if self.recovery.abandon(msg_id) {
            self.release_held(ctx);
        }
        let frame = self.control_frame(
            FrameKind::Error,
            msg_id,
            &ErrorBody {
                code: code.code(),
                message,
            },
        );
        self.enqueue(frame, ctx);
    }

    /// Queues a WebSocket message for the client; closes the client as a slow consumer when
    /// its queue is full.
    fn enqueue(&mut self, frame: Bytes, ctx: &mut Ctx) {
        self.queue(frame, false, ctx);
    }

    /// Queues a heartbeat ack ahead of queued pushes (see `Outbox::enqueue_urgent`).
    fn enqueue_urgent(&mut self, frame: Bytes, ctx: &mut Ctx) {
        self.queue(frame, true, ctx);
    }

    fn queue(&mut self, frame: Bytes, urgent: bool, ctx: &mut Ctx) {
        if self.closing.is_some() {
            return;
        }
        let queued = if urgent {
            self.outbox.enqueue_urgent(frame)
        } else {
            self.outbox.enqueue(frame)
        };
        if queued.is_err() {
            self.close(CloseCode::SlowConsumer, ctx);
            return;
        }
        self.pump(ctx);
    }

    /// Starts the writer if it is idle and there is something to write; once a close is
    /// pending and everything queued is written, sends the close frame.
    fn pump(&mut self, ctx: &mut Ctx) {
        if self.writer.is_some() {
            return;
        }
        let Some(batch) = self.outbox.take() else {
            if self.closing.is_some() && self.outbox.idle() {
                self.send_close(ctx);
            }
            return;
        };
        let Batch {
            frames: mut batch,
            count: frames,
            bytes,
        } = batch;
        let sink = Rc::clone(&self.sink);
        let timeout = self.shared.config.write_timeout;
        let write = async move {
            tokio::time::timeout(timeout, async move {
                sink.lock().await.write_all(&mut batch).await
            })
            .await
        };
        let handle = ctx.spawn(write.into_actor(self).map(move |result, act, ctx| {
            act.writer = None;
            act.outbox.written();
            match result {
                Ok(Ok(())) => {
                    act.shared.metrics.frames_out.inc_by(frames);
                    act.shared.metrics.bytes_out.inc_by(bytes);
                    act.pump(ctx);
                }
                // The peer is gone; nothing more can reach it.
                Ok(Err(err)) => {
                    tracing::debug!(socket_id = %act.id, error = %err, "Write failed.");
                    act.peer_reason
                        .get_or_insert_with(|| format!("connection lost: {err}"));
                    ctx.stop();
                }
                Err(_elapsed) => act.close(CloseCode::SlowConsumer, ctx),
            }
        }));
        self.writer = Some(handle);
    }

    /// Closes the connection with `code`. Frames already queued (an error frame explaining
    /// the close, say) are written first, within one second; a slow consumer's queue is
    /// dropped instead, since it is the reason for the close.
    fn close(&mut self, code: CloseCode, ctx: &mut Ctx) {
        self.close_with(code, None, ctx);
    }

    /// Like [`Conn::close`], with a reason other than the code's own in the close frame.
    fn close_with(&mut self, code: CloseCode, reason: Option<String>, ctx: &mut Ctx) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(code);
        self.close_reason = reason;
        self.shared.metrics.closed(code);
        self.outbox.close(code == CloseCode::SlowConsumer);
        if code == CloseCode::SlowConsumer {
            self.send_close(ctx);
            return;
        }
        ctx.run_later(CLOSE_FLUSH_TIMEOUT, |act, ctx| act.send_close(ctx));
        self.pump(ctx);
    }

    /// Sends the close frame (bounded wait) and stops the actor afterwards.
    fn send_close(&mut self, ctx: &mut Ctx) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        if let Some(writer) = self.writer.take() {
            ctx.cancel_future(writer);
            self.outbox.written();
        }
        let code = self.closing.unwrap_or(CloseCode::Shutdown);
        let reason = self
            .close_reason
            .take()
            .unwrap_or_else(|| code.reason().to_owned());
        self.finish(ws::close(code.code(), &reason), ctx);
    }

    /// Writes `close` (within [`CLOSE_FLUSH_TIMEOUT`]), ends the write side, then stops the
    /// actor, which drops the read side and with it the socket.
    fn finish(&mut self, close: Bytes, ctx: &mut Ctx) {
        let sink = Rc::clone(&self.sink);
        ctx.wait(
            async move {
                let close = async move { sink.lock().await.close(close).await };
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, close).await;
            }
            .into_actor(self)
            .map(|(), _, ctx| ctx.stop()),
        );
    }

    /// Who this session's messages come from, as the bus headers name it.
    fn origin(&self) -> Origin {
        Origin {
            socket_id: self.id,
            user_id: self.user.clone(),
            gateway: self.shared.config.instance.clone(),
            kind: self.kind,
        }
    }

    /// Headers of a session event that no client frame caused (connect, disconnect).
    fn session_headers(&self, op: ClientOp) -> HeaderMap {
        SessionEnvelope {
            origin: self.origin(),
            op,
            msg_id: 0,
            trace: None,
        }
        .to_headers()
    }

    /// Hands a message to the bus publisher. A failure is reported to the client when the
    /// message carries a client request (`request` is its message id, which may be 0);
    /// events of the gateway's own (connect, receipts) have no one to tell.
    fn publish(&mut self, out: Outbound, request: Option<u64>, ctx: &mut Ctx) {
        if let Err(reason) = self.shared.bus.send(out) {
            self.shared.metrics.publish_errors.inc();
            if let Some(msg_id) = request {
                self.send_error(msg_id, ErrorCode::Unavailable, reason.to_owned(), ctx);
            }
        }
    }

    fn event(&self, event: Event, headers: HeaderMap, payload: Vec<u8>) -> Outbound {
        Outbound::Publish {
            subject: subject::event(self.kind, event),
            headers,
            payload: Bytes::from(payload),
            reply: None,
        }
    }

    fn session_event(
        &self,
        close_code: Option<u16>,
        reason: Option<String>,
    ) -> payload::SessionEvent {
        payload::SessionEvent {
            socket_id: self.id,
            user_id: self.user.clone(),
            kind: self.kind,
            gateway: self.shared.config.instance.clone(),
            at_ms: now_ms(),
            allowed_rooms: self
                .allowed_rooms
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect(),
            close_code,
            reason,
            via: self.via.clone(),
            rooms: Vec::new(),
            connected_at_ms: None,
        }
    }

    fn welcome(&mut self, ctx: &mut Ctx) {
        let welcome = payload::Welcome {
            socket_id: self.id,
            user_id: self.user.clone(),
            gateway: self.shared.config.instance.clone(),
            heartbeat: self.shared.config.heartbeat,
            max_body_bytes: u32::try_from(self.shared.config.limits.max_body_len)
                .unwrap_or(u32::MAX),
            server_time_ms: now_ms(),
            recovery: None,
        };
        self.send_welcome(&welcome, ctx);
    }

    /// Sends the welcome (with the user stream's recovery, and the replayed pushes after it).
    fn send_welcome(&mut self, welcome: &payload::Welcome, ctx: &mut Ctx) {
        let frame = self.control_frame(FrameKind::Welcome, 0, &welcome);
        self.enqueue(frame, ctx);
        self.announce(ctx);
        self.schedule_deadline_check(ctx);
        tracing::debug!(socket_id = %self.id, user_id = %self.user, kind = %self.kind, "Session opened.");
    }

    /// The user stream's replay runs while the mailbox is held (before the welcome, so no
    /// push and no client frame is processed meanwhile); the welcome then says whether the
    /// client recovered, and the replayed pushes follow it.
    fn welcome_after_replay(&mut self, since: JoinSince, ctx: &mut Ctx) {
        let read = history::replay(
            self.shared.bus.client().clone(),
            self.user.clone(),
            StreamRef::User,
            since,
            self.shared.config.replay_cap(),
        );
        let task = self.shared.bus.runtime().spawn(read);
        ctx.wait(task.into_actor(self).map(|replay, act, ctx| {
            let welcome = payload::Welcome {
                socket_id: act.id,
                user_id: act.user.clone(),
                gateway: act.shared.config.instance.clone(),
                heartbeat: act.shared.config.heartbeat,
                max_body_bytes: u32::try_from(act.shared.config.limits.max_body_len)
                    .unwrap_or(u32::MAX),
                server_time_ms: now_ms(),
                recovery: Some(replay.as_ref().map_or(
                    payload::Recovery {
                        recovered: false,
                        epoch: 0,
                        offset: 0,
                    },
                    |r| r.recovery,
                )),
            };
            act.send_welcome(&welcome, ctx);
            match replay {
                Ok(replay) => act.send_replay(replay, ctx),
                Err(_) => act.shared.metrics.recovery(false),
            }
        }));
    }

    /// Publishes the connect event: the first one, or a re-announce a service asked for
    /// (with the original connect time and the rooms, so a rebuilt record loses neither).
    fn announce(&mut self, ctx: &mut Ctx) {
        let mut event = self.session_event(None, None);
        match self.announced_at_ms {
            None => self.announced_at_ms = Some(event.at_ms),
            Some(at) => {
                event.connected_at_ms = Some(at);
                event.rooms.clone_from(&self.rooms);
            }
        }
        match payload::to_bus(&event) {
            Ok(body) => {
                let out = self.event(
                    Event::Connect,
                    self.session_headers(ClientOp::Connect),
                    body,
                );
                self.publish(out, None, ctx);
            }
            Err(e) => tracing::error!(error = %e, "Encoding a connect event failed."),
        }
    }

    /// Takes a token from the rate limit for a message from the client (a frame or a
    /// WebSocket ping). Without one, the message is dropped: a strike, and after more than
    /// `rate_burst` strikes since the bucket was last full the connection is closed with
    /// 4004 ([`RateLimit`]). Returns whether the
    /// message may be processed; a dropped one is answered by the caller (or not at all).
    fn admit_message(&mut self, now: Instant, ctx: &mut Ctx) -> Admit {
        let admit = self.rate.admit(now);
        if admit != Admit::Go {
            self.shared.metrics.rate_limited.inc();
        }
        if admit == Admit::Closed {
            self.close(CloseCode::RateLimited, ctx);
        }
        admit
    }

    fn on_binary(&mut self, bytes: &Bytes, ctx: &mut Ctx) {
        let now = Instant::now();
        self.shared.metrics.bytes_in.inc_by(bytes.len() as u64);
        match self.admit_message(now, ctx) {
            Admit::Go => {}
            Admit::Closed => return,
            Admit::Dropped => {
                // The frame was not decoded; its id, where the fixed header has one, lets
                // the client tell which request to send again.
                let msg_id = peek_msg_id(bytes);
                let message = "rate limit exceeded".to_owned();
                return self.send_error(msg_id, ErrorCode::RateLimited, message, ctx);
            }
        }
        let metrics = &self.shared.metrics;
        let frame = match Frame::decode(bytes, &self.shared.config.limits) {
            Ok(frame) => frame,
            Err(err) => return self.on_bad_frame(&err, ctx),
        };
        metrics.frame_in(frame.kind);
        self.hb.on_activity(now);
        match frame.kind {
            FrameKind::Heartbeat => {
                if self.hb.on_beat(now) == Beat::Late {
                    self.shared.metrics.heartbeat_late.inc();
                }
                let ack = HeartbeatAck {
                    next_interval_ms: self.hb.interval_ms(),
                };
                let frame = self.control_frame(FrameKind::HeartbeatAck, frame.msg_id, &ack);
                self.enqueue_urgent(frame, ctx);
            }
            FrameKind::Hello => {}
            FrameKind::Publish => self.on_publish(frame, ctx),
            FrameKind::Ack => {
                let up = upstream::ack(self.origin(), &frame);
                let out = Outbound::Publish {
                    subject: up.subject,
                    headers: up.headers,
                    payload: up.payload,
                    reply: None,
                };
                self.publish(out, None, ctx);
            }
            FrameKind::Join | FrameKind::Leave => self.on_room_request(&frame, ctx),
            FrameKind::Refresh => self.on_refresh(&frame, ctx),
            FrameKind::Welcome
            | FrameKind::HeartbeatAck
            | FrameKind::Push
            | FrameKind::Error
            | FrameKind::Reconnect => {
                let message = format!("{} frames are sent by the gateway, not to it", frame.kind);
                self.send_error(frame.msg_id, ErrorCode::UnexpectedFrame, message, ctx);
            }
        }
    }

    /// A new token for the same identity extends the session to its expiry: a client (an
    /// agent whose control plane renews its credential, a browser whose app refreshes its
    /// login) keeps its socket, subscriptions and rooms instead of reconnecting. Anything
    /// else is an error frame and the session keeps its old expiry.
    fn on_refresh(&mut self, frame: &Frame, ctx: &mut Ctx) {
        let refused = |msg: String| (ErrorCode::Forbidden, msg);
        let outcome = std::str::from_utf8(&frame.body)
            .map_err(|_| refused("refresh body must be the token (UTF-8)".into()))
            .and_then(|token| {
                crate::auth::verify(token.trim(), &self.shared.config.keys)
                    .map_err(|e| refused(format!("refresh refused: {e}")))
            })
            .and_then(|id| {
                if id.user_id != self.user || id.kind != self.kind {
                    Err(refused(format!(
                        "refresh refused: the token is for {} {}, this session is {} {}",
                        id.kind, id.user_id, self.kind, self.user
                    )))
                } else {
                    Ok(id.expires_at)
                }
            });
        match outcome {
            Ok(expires_at) => {
                if expires_at > self.expires_at {
                    self.expires_at = expires_at;
                }
                tracing::debug!(socket_id = %self.id, expires_at, "Session refreshed.");
                self.send_ack(frame.msg_id, ctx);
            }
            Err((code, message)) => self.send_error(frame.msg_id, code, message, ctx),
        }
    }

    /// Closes the session with 4502 once its credential has expired; a refresh may have
    /// moved the expiry since this check was scheduled, then it is scheduled again.
    fn schedule_expiry(&self, ctx: &mut Ctx) {
        let now_s = now_ms() / 1000;
        if self.expires_at <= now_s {
            return;
        }
        let left = Duration::from_secs(self.expires_at - now_s);
        ctx.run_later(left, |act, ctx| {
            if now_ms() / 1000 >= act.expires_at {
                act.close(CloseCode::Unauthorized, ctx);
            } else {
                act.schedule_expiry(ctx);
            }
        });
    }

    /// Every decoder error ends the session: a client that sends an undecodable frame has a
    /// bug (or is probing), and everything it sent after would be a guess. The error frame
    /// says what was wrong; it carries message id 0 because nothing in a frame that failed
    /// to decode is trusted, and no other answer will follow anyway.
    fn on_bad_frame(&mut self, err: &FrameError, ctx: &mut Ctx) {
        self.shared.metrics.frame_errors.inc();
        tracing::debug!(socket_id = %self.id, error = %err, "Bad frame.");
        self.send_error(0, err.error_code(), err.to_string(), ctx);
        self.close(err.close_code(), ctx);
    }

    fn on_publish(&mut self, frame: Frame, ctx: &mut Ctx) {
        let msg_id = frame.msg_id;
        let up = match upstream::publish(self.origin(), frame) {
            Ok(up) => up,
            Err(refusal) => return self.send_error(msg_id, refusal.code, refusal.message, ctx),
        };
        // Id 0 gets no ack but still hears of a failure, so the outcome is always reported.
        let reply = Some((ctx.address().recipient(), msg_id));
        let out = Outbound::Publish {
            subject: up.subject,
            headers: up.headers,
            payload: up.payload,
            reply,
        };
        self.publish(out, Some(msg_id), ctx);
    }

    fn on_room_request(&mut self, frame: &Frame, ctx: &mut Ctx) {
        let msg_id = frame.msg_id;
        if frame.kind == FrameKind::Join
            && let Some(room) = upstream::room_of(frame)
            && !self.room_available(&room)
        {
            let message = format!(
                "this socket is in (or asked for) {} rooms, the maximum",
                self.shared.config.max_rooms_per_socket
            );
            return self.send_error(msg_id, ErrorCode::RateLimited, message, ctx);
        }
        let (event, up) = match upstream::room_request(self.origin(), frame) {
            Ok(request) => request,
            Err(refusal) => return self.send_error(msg_id, refusal.code, refusal.message, ctx),
        };
        if event == Event::Join
            && let Err(message) = self.recovery.join_requested(frame)
        {
            return self.send_error(msg_id, ErrorCode::BadFrame, message, ctx);
        }
        if msg_id != 0 && self.shared.bus.send_ok() {
            // The services answer with a control message; if none comes, say so.
            self.pending.push((msg_id, event == Event::Join));
            ctx.run_later(self.shared.config.request_timeout, move |act, ctx| {
                if act.answered(msg_id) {
                    let message = "the services did not answer in time".to_owned();
                    act.send_error(msg_id, ErrorCode::Timeout, message, ctx);
                }
            });
        }
        let out = Outbound::Publish {
            subject: up.subject,
            headers: up.headers,
            payload: up.payload,
            reply: None,
        };
        self.publish(out, Some(msg_id), ctx);
    }

    /// Whether this socket may join `room` without passing the room cap: rooms it is in
    /// and joins still waiting for the services both count, so a burst of join requests
    /// cannot overshoot.
    fn room_available(&self, room: &RoomId) -> bool {
        if self.rooms.contains(room) {
            return true;
        }
        let pending_joins = self.pending.iter().filter(|(_, join)| *join).count();
        self.rooms.len() + pending_joins < self.shared.config.max_rooms_per_socket
    }

    /// Marks a forwarded request as answered; returns whether it was still pending.
    fn answered(&mut self, msg_id: u64) -> bool {
        let before = self.pending.len();
        self.pending.retain(|(id, _)| *id != msg_id);
        self.pending.len() != before
    }

    fn on_control(&mut self, control: GatewayControl, ctx: &mut Ctx) {
        match &control {
            GatewayControl::Join { msg_id, .. }
            | GatewayControl::Leave { msg_id, .. }
            | GatewayControl::Refuse { msg_id, .. } => {
                self.answered(*msg_id);
            }
            GatewayControl::Close { .. } | GatewayControl::Resync { .. } => {}
        }
        match control {
            // Applied by the hub (in the bus's order); they arrive as `Joined` / `Left`.
            GatewayControl::Join { .. } | GatewayControl::Leave { .. } => {}
            GatewayControl::Refuse {
                msg_id,
                code,
                reason,
                ..
            } => {
                let code = ErrorCode::from_code(code).unwrap_or(ErrorCode::Forbidden);
                self.send_error(msg_id, code, reason, ctx);
            }
            GatewayControl::Close { code, reason, .. } => {
                // The service's reason reaches the client (it is what the client can show);
                // a code this gateway does not know becomes 4503, which means the same.
                let code = CloseCode::from_code(code).unwrap_or(CloseCode::Kicked);
                let reason = (!reason.is_empty()).then(|| close_reason(&reason).to_owned());
                self.close_with(code, reason, ctx);
            }
            GatewayControl::Resync { .. } => {}
        }
    }

    /// A service's join, applied by the hub. The ack waits until the room subscription is
    /// live: after the ack, no room push is missed; not confirmed in time, the client is
    /// told to retry.
    fn on_joined(
        &mut self,
        room: RoomId,
        msg_id: u64,
        outcome: Result<(bool, Live), RoomsFull>,
        ctx: &mut Ctx,
    ) {
        self.answered(msg_id);
        let live = match outcome {
            Ok((added, live)) => {
                if added && !self.rooms.contains(&room) {
                    self.rooms.push(room.clone());
                }
                live
            }
            Err(RoomsFull) => {
                // Also for memberships a service adds: the cap bounds what one socket costs
                // this replica, whoever asked.
                tracing::warn!(socket_id = %self.id, %room, "Join refused: room cap reached.");
                if msg_id != 0 {
                    let message = format!(
                        "this socket is in {} rooms, the maximum",
                        self.shared.config.max_rooms_per_socket
                    );
                    self.send_error(msg_id, ErrorCode::RateLimited, message, ctx);
                }
                return;
            }
        };
        if msg_id != 0 {
            ctx.spawn(
                live.wait(LIVE_TIMEOUT)
                    .into_actor(self)
                    .map(move |live, act, ctx| {
                        if live && let Some(since) = act.recovery.since_of(msg_id) {
                            act.start_replay(msg_id, StreamRef::Room(room), since, ctx);
                        } else if live {
                            act.send_ack(msg_id, ctx);
                        } else {
                            act.send_error(
                                msg_id,
                                ErrorCode::Unavailable,
                                "room subscription not confirmed by the bus; retry".into(),
                                ctx,
                            );
                        }
                    }),
            );
        }
    }

    /// Reads what the client missed in `stream` (it is live for this socket now, so
    /// nothing falls between the replay and the held live pushes), then answers `msg_id`
    /// (a join's ack with a [`payload::Recovery`] body) and sends the replay.
    fn start_replay(&mut self, msg_id: u64, stream: StreamRef, since: JoinSince, ctx: &mut Ctx) {
        let read = history::replay(
            self.shared.bus.client().clone(),
            self.user.clone(),
            stream,
            since,
            self.shared.config.replay_cap(),
        );
        let task = self.shared.bus.runtime().spawn(read);
        ctx.spawn(task.into_actor(self).map(move |replay, act, ctx| {
            let Ok(replay) = replay else {
                // The read task died; the client is told it did not recover.
                act.shared.metrics.recovery(false);
                act.send_error(msg_id, ErrorCode::Internal, "recovery failed".into(), ctx);
                return;
            };
            if !act.recovery.finish(msg_id) {
                return;
            }
            let frame = act.control_frame(FrameKind::Ack, msg_id, &replay.recovery);
            act.enqueue(frame, ctx);
            act.send_replay(replay, ctx);
            act.release_held(ctx);
        }));
    }

    /// Queues replayed pushes and remembers which live ones they cover.
    fn send_replay(&mut self, replay: history::Replay, ctx: &mut Ctx) {
        let metrics = &self.shared.metrics;
        metrics.recovery(replay.recovery.recovered);
        metrics.pushes_delivered.inc_by(replay.frames.len() as u64);
        metrics.pushes_replayed.inc_by(replay.frames.len() as u64);
        if let Some(rule) = replay.dedupe() {
            self.recovery.dedupe.push(rule);
        }
        if self.outbox.extend(replay.frames.into()).is_err() {
            return self.close(CloseCode::SlowConsumer, ctx);
        }
        self.pump(ctx);
    }

    /// Once no replay runs, sends the live pushes held meanwhile, minus those replayed.
    fn release_held(&mut self, ctx: &mut Ctx) {
        let Some(held) = self.recovery.release() else {
            return;
        };
        if held.is_empty() || self.closing.is_some() {
            return;
        }
        self.shared
            .metrics
            .pushes_delivered
            .inc_by(held.len() as u64);
        if self.outbox.extend(held).is_err() {
            return self.close(CloseCode::SlowConsumer, ctx);
        }
        self.pump(ctx);
    }

    /// A service's leave, applied by the hub.
    fn on_left(&mut self, room: &RoomId, msg_id: u64, ctx: &mut Ctx) {
        self.answered(msg_id);
        self.rooms.retain(|r| r != room);
        self.send_ack(msg_id, ctx);
    }

    fn schedule_deadline_check(&self, ctx: &mut Ctx) {
        let wait = self.hb.deadline().saturating_duration_since(Instant::now());
        ctx.run_later(wait + Duration::from_millis(5), |act, ctx| {
            if act.closing.is_some() {
                return;
            }
            if act.hb.expired(Instant::now()) {
                act.close(CloseCode::HeartbeatTimeout, ctx);
            } else {
                act.schedule_deadline_check(ctx);
            }
        });
    }
}

type Ctx = actix::Context<Conn>;

impl actix::Actor for Conn {
    type Context = Ctx;

    fn started(&mut self, ctx: &mut Ctx) {
        let live = self
            .shared
            .hub
            .add(self.id, &self.user, self.kind, self.conn_handle(ctx));
        self.shared.metrics.connections.inc();
        // A credential is only good until it expires (or a refresh extends it).
        self.schedule_expiry(ctx);
        // Hold the mailbox and the read side until the user subscription is live, so that
        // the welcome promises: every push to this user from now on arrives. A subscription
        // NATS did not confirm in time cannot keep that promise: the client is told to come
        // back (4003, retryable) rather than welcomed into a session that misses pushes.
        ctx.wait(
            live.wait(LIVE_TIMEOUT)
                .into_actor(self)
                .map(|live, act, ctx| {
                    if live && let Some(since) = act.recovery.conn.user_since {
                        act.welcome_after_replay(since, ctx);
                    } else if live {
                        act.welcome(ctx);
                    } else {
                        tracing::warn!(
                            socket_id = %act.id,
                            "User subscription not confirmed by NATS in time; closing."
                        );
                        act.close(CloseCode::NotReady, ctx);
                    }
                }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Ctx) {
        self.shared.hub.remove(self.id, &self.user, &self.rooms);
        self.shared.metrics.connections.dec();
        let code = self.closing.map(CloseCode::code);
        let reason = self
            .closing
            .map(|c| c.as_str().to_owned())
            .or_else(|| self.peer_reason.take());
        // A long-poll client learns the code from its next poll.
        let close_reason = self.closing.map(|c| c.reason());
        self.shared.longpoll.ended(self.id, code, close_reason);
        // Sent through the publisher's queue, not a spawned future: futures spawned on this
        // actor are dropped with it (docs/dependencies.md, trap 2).
        match payload::to_bus(&self.session_event(code, reason)) {
            Ok(body) => {
                let out = self.event(
                    Event::Disconnect,
                    self.session_headers(ClientOp::Disconnect),
                    body,
                );
                if self.shared.bus.send(out).is_err() {
                    self.shared.metrics.publish_errors.inc();
                }
            }
            Err(e) => tracing::error!(error = %e, "Encoding a disconnect event failed."),
        }
        tracing::debug!(socket_id = %self.id, code = ?self.closing, "Session closed.");
    }
}

impl StreamHandler<Result<WsMessage, WsError>> for Conn {
    fn handle(&mut self, item: Result<WsMessage, WsError>, ctx: &mut Ctx) {
        if self.closing.is_some() || self.peer_reason.is_some() {
            return;
        }
        match item {
            Ok(WsMessage::Binary(bytes)) => self.on_binary(&bytes, ctx),
            Ok(WsMessage::Text) => {
                // A protocol violation like an undecodable frame, with the same outcome.
                self.shared.metrics.frame_errors.inc();
                let message =
                    "text messages are not part of the protocol; send binary frames".into();
                self.send_error(0, ErrorCode::BadFrame, message, ctx);
                self.close(CloseCode::ProtocolError, ctx);
            }
            Ok(WsMessage::Ping(payload)) => {
                // Not session activity: only protocol frames keep a session open, so a
                // client's WebSocket library pinging on its own cannot hide a dead client.
                // A ping over the rate limit gets no pong (and no error frame: pings are
                // not frames of the protocol).
                if self.admit_message(Instant::now(), ctx) == Admit::Go {
                    self.outbox.ping(payload);
                    self.pump(ctx);
                }
            }
            // Unsolicited (the gateway sends no pings): ignored, and not activity either.
            Ok(WsMessage::Pong) => {}
            Ok(WsMessage::Close(code)) => {
                self.peer_reason = Some(match code {
                    Some(code) => format!("peer closed: {code}"),
                    None => "peer closed".to_owned(),
                });
                // Echo the close, then stop. A writer still running is dropped: the peer
                // said it reads no more.
                self.close_sent = true;
                if let Some(writer) = self.writer.take() {
                    ctx.cancel_future(writer);
                    self.outbox.written();
                }
                self.finish(ws::close_empty(), ctx);
            }
            Err(WsError::Overflow(_)) => {
                self.shared.metrics.frame_errors.inc();
                let max = self.shared.config.limits.max_body_len;
                self.send_error(
                    0,
                    ErrorCode::TooLarge,
                    format!("frame larger than {max} bytes"),
                    ctx,
                );
                self.close(CloseCode::FrameTooLarge, ctx);
            }
            Err(WsError::Io(err)) => {
                // The peer went away (reset, EOF mid-frame): nothing to tell it.
                tracing::debug!(socket_id = %self.id, error = %err, "Connection lost.");
                self.peer_reason = Some(format!("connection lost: {err}"));
                ctx.stop();
            }
            Err(err @ WsError::Protocol(_)) => {
                self.shared.metrics.frame_errors.inc();
                tracing::debug!(socket_id = %self.id, error = %err, "WebSocket protocol error.");
                self.close(CloseCode::ProtocolError, ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Ctx) {
        // The read side ended: the peer is gone, or it broke the protocol and a close is
        // already under way (it stops the actor once the close frame is out).
        if self.closing.is_none() && !self.close_sent {
            self.peer_reason
                .get_or_insert_with(|| "connection closed without a close frame".to_owned());
            ctx.stop();
        }
    }
}

impl Handler<ToConn> for Conn {
    type Result = ();

    fn handle(&mut self, msg: ToConn, ctx: &mut Ctx) {
        match msg {
            ToConn::Drain => self.drain_inbox(ctx),
            ToConn::Control(control) => self.on_control(control, ctx),
            ToConn::Joined {
                room,
                msg_id,
                outcome,
            } => self.on_joined(room, msg_id, outcome, ctx),
            ToConn::Left { room, msg_id } => self.on_left(&room, msg_id, ctx),
            ToConn::Announce => self.announce(ctx),
            ToConn::Reconnect {
                delay,
                code,
                reason,
            } => {
                let body = Reconnect {
                    delay_ms: u32::try_from(delay.as_millis()).unwrap_or(u32::MAX),
                    reason: reason.into(),
                };
                let frame = self.control_frame(FrameKind::Reconnect, 0, &body);
                self.enqueue(frame, ctx);
                ctx.run_later(delay, move |act, ctx| act.close(code, ctx));
            }
        }
    }
}

impl Handler<PublishOutcome> for Conn {
    type Result = ();

    fn handle(&mut self, outcome: PublishOutcome, ctx: &mut Ctx) {
        match outcome {
            PublishOutcome::Published(msg_id) => self.send_ack(msg_id, ctx),
            PublishOutcome::Failed(msg_id) => {
                let message = "message bus unavailable; not delivered".to_owned();
                self.send_error(msg_id, ErrorCode::Unavailable, message, ctx);
            }
        }
    }
}

/// What the rate limit says about a message from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Process it.
    Go,
    /// Drop it; the connection stays.
    Dropped,
    /// Drop it; the connection is closing (4004).
    Closed,
}

/// The longest prefix of `reason` that fits a close frame (123 bytes), cut at a character
/// boundary.
fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(messages::close::MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// The message id in bytes 4-11 of a frame that was dropped undecoded (rate limit), so the
/// error frame can name it; 0 when the message is shorter.
fn peek_msg_id(bytes: &[u8]) -> u64 {
    bytes
        .get(4..12)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, t0);
        assert_eq!((0..10).filter(|_| bucket.take(t0)).count(), 5);
        // 100 ms at 10/s refills one token.
        assert!(bucket.take(t0 + Duration::from_millis(100)));
        assert!(!bucket.take(t0 + Duration::from_millis(100)));
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(later)).count(), 5);
    }

    #[test]
    fn more_strikes_than_the_burst_close_and_only_a_full_bucket_clears_them() {
        let t0 = Instant::now();
        let mut rate = RateLimit::new(10, 3, t0);
        assert!((0..3).all(|_| rate.admit(t0) == Admit::Go), "the burst");
        assert!(
            (0..3).all(|_| rate.admit(t0) == Admit::Dropped),
            "three strikes"
        );
        // A full bucket later (300 ms at 10/s) clears them: three more may be dropped.
        let t1 = t0 + Duration::from_millis(300);
        assert!((0..3).all(|_| rate.admit(t1) == Admit::Go));
        assert!((0..3).all(|_| rate.admit(t1) == Admit::Dropped));
        assert_eq!(rate.admit(t1), Admit::Closed, "the fourth strike");
    }

    #[test]
    fn a_flood_that_gets_a_token_at_every_refill_is_still_closed() {
        // 10 per second: a token every 100 ms; the flood sends one message every 20 ms, so
        // every fifth one is admitted. Clearing the strikes on each admitted message kept
        // such a flood open for good.
        let t0 = Instant::now();
        let mut rate = RateLimit::new(10, 3, t0);
        let closed = (0..100u64)
            .map(|i| rate.admit(t0 + Duration::from_millis(20 * i)))
            .position(|a| a == Admit::Closed);
        assert!(closed.is_some_and(|i| i < 20), "{closed:?}");
    }

    #[test]
    fn a_close_reason_is_cut_to_123_bytes_at_a_character_boundary() {
        assert_eq!(close_reason("bye"), "bye");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && cut.len() >= 122, "{}", cut.len());
        assert!(long.starts_with(cut));
    }

    #[test]
    fn msg_id_is_peeked_from_a_broken_frame() {
        let frame = Frame::new(FrameKind::Publish).with_msg_id(77).encode();
        assert_eq!(peek_msg_id(&frame), 77);
        assert_eq!(peek_msg_id(&frame[..5]), 0);
    }
}
