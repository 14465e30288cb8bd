//! Consumers of gateway traffic (queue group `ws-api`, so replicas share the load):
//! lifecycle events into the presence registry, join/leave requests decided and answered,
//! receipts counted, and clients' publish frames forwarded to product services on
//! `app.<route>` with headers intact and bodies untouched.

use std::sync::Arc;

use async_nats::Message;
use bytes::Bytes;
use futures_util::StreamExt;
use messages::envelope::{AckEnvelope, DeliveredEnvelope, EnvelopeError};
use messages::payload::{
    self, GatewayControl, HeartbeatBatch, PayloadError, RoomRequest, SessionEvent,
};
use messages::subject::{self, Event, Subject};
use messages::{ClientKind, ErrorCode, Route, TraceContext, headers};
use servicekit::telemetry::{MessageSpan, Operation};

use crate::Shared;
use crate::config::RoomPolicy;
use crate::presence::PresenceError;

/// Why handling one gateway event, or sending one control message, failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EventError {
    /// A bus payload could not be decoded or encoded.
    #[error("payload: {0}")]
    Payload(#[from] PayloadError),
    /// The event's headers are not the envelope its subject calls for.
    #[error("headers: {0}")]
    Envelope(#[from] EnvelopeError),
    /// The presence registry refused or failed.
    #[error("presence: {0}")]
    Presence(#[from] PresenceError),
    /// Publishing to the bus failed.
    #[error("publish: {0}")]
    Publish(#[from] async_nats::PublishError),
}

/// Runs the event consumer until the subscription ends.
pub(crate) async fn consume_events(shared: Arc<Shared>) {
    let subject = subject::event_wildcard(ClientKind::App);
    let mut sub = match shared
        .client
        .queue_subscribe(subject.clone(), subject::QUEUE_WS_API.into())
        .await
    {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(%subject, error = %e, "Subscribing to gateway events failed.");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let shared = Arc::clone(&shared);
        // Each event is independent; a slow KV round trip must not hold up the others.
        tokio::spawn(async move { handle_event(&shared, msg).await });
    }
}

async fn handle_event(shared: &Shared, msg: Message) {
    let Ok(Subject::Event { event, .. }) = Subject::parse(msg.subject.as_str()) else {
        return;
    };
    shared.metrics.events.inc();
    // Only events that belong to a message's trace (acks, joins a client asked for) get a
    // span; presence traffic such as heartbeat batches would only add noise.
    let hop = servicekit::telemetry::on_receive(&msg, &shared.metrics.hops);
    let result = match event {
        Event::Connect => match payload::from_bus::<SessionEvent>(&msg.payload) {
            Ok(e) => shared
                .presence
                .connected(&e)
                .await
                .map_err(EventError::from),
            Err(e) => Err(e.into()),
        },
        Event::Disconnect => match payload::from_bus::<SessionEvent>(&msg.payload) {
            Ok(e) => shared
                .presence
                .disconnected(e.socket_id)
                .await
                .map_err(EventError::from),
            Err(e) => Err(e.into()),
        },
        Event::Heartbeat => match payload::from_bus::<HeartbeatBatch>(&msg.payload) {
            Ok(b) => last_seen(shared, b).await,
            Err(e) => Err(e.into()),
        },
        Event::Join | Event::Leave => match payload::from_bus::<RoomRequest>(&msg.payload) {
            Ok(r) => room_request(shared, event == Event::Join, r).await,
            Err(e) => Err(e.into()),
        },
        Event::Ack | Event::Delivered => receipt(shared, event, &msg),
    };
    if let Err(e) = result {
        shared.metrics.event_errors.inc();
        let trace_id = hop.as_ref().map(MessageSpan::trace_id).unwrap_or_default();
        if let Some(hop) = &hop {
            hop.fail(&e.to_string());
        }
        tracing::warn!(subject = %msg.subject, error = %e, %trace_id, "Handling a gateway event failed.");
    }
}

/// Refreshes presence from a gateway's batch, and asks the gateway to announce again the
/// sockets it vouched for that presence has no record of (lost refreshes, lost connect
/// events): without that, nothing but a reconnect would bring them back.
async fn last_seen(shared: &Shared, batch: HeartbeatBatch) -> Result<(), EventError> {
    let seen = shared.presence.seen(&batch.seen).await;
    if !seen.missing.is_empty() {
        shared
            .metrics
            .resync_asked
            .inc_by(seen.missing.len() as u64);
        tracing::info!(
            gateway = %batch.gateway,
            sockets = seen.missing.len(),
            "Live sockets without a session record; asking their gateway to announce them."
        );
        let resync = GatewayControl::Resync {
            sockets: seen.missing,
        };
        send_control(shared, &batch.gateway, &resync).await?;
    }
    seen.error.map_or(Ok(()), |e| Err(e.into()))
}

fn receipt(shared: &Shared, event: Event, msg: &Message) -> Result<(), EventError> {
    let Some(map) = msg.headers.as_ref() else {
        return Ok(());
    };
    let (id, delivered, acked) = match event {
        Event::Delivered => {
            let report = DeliveredEnvelope::from_headers(map)?;
            (report.push_id, report.count, 0)
        }
        _ => (AckEnvelope::from_headers(map)?.push_id, 0, 1),
    };
    // An ack that names no push (a client acknowledging id 0) counts towards nothing.
    if id != 0 {
        shared.receipts.add(id, delivered, acked);
    }
    Ok(())
}

/// Whether `record` may join `room` under the configured policy.
fn may_join(shared: &Shared, allowed: &[String], room: &messages::RoomId) -> bool {
    shared.config.room_policy == RoomPolicy::Open
        || allowed.iter().any(|r| r == room.as_str())
        || shared
            .config
            .open_room_prefixes
            .iter()
            .any(|p| room.as_str().starts_with(p.as_str()))
}

async fn room_request(shared: &Shared, join: bool, req: RoomRequest) -> Result<(), EventError> {
    let control = if join {
        match shared
            .presence
            .wait_for(req.socket_id, shared.config.session_wait)
            .await
        {
            None => GatewayControl::Refuse {
                socket_id: req.socket_id,
                msg_id: req.msg_id,
                code: ErrorCode::Unavailable.code(),
                reason: "session not known yet; retry".into(),
            },
            Some(record) if !may_join(shared, &record.allowed_rooms, &req.room) => {
                GatewayControl::Refuse {
                    socket_id: req.socket_id,
                    msg_id: req.msg_id,
                    code: ErrorCode::Forbidden.code(),
                    reason: format!("not allowed to join {}", req.room),
                }
            }
            Some(_) => {
                let room = req.room.clone();
                shared
                    .presence
                    .modify(req.socket_id, |r| {
                        if !r.rooms.contains(&room) {
                            r.rooms.push(room.clone());
                        }
                    })
                    .await?;
                GatewayControl::Join {
                    socket_id: req.socket_id,
                    room: req.room.clone(),
                    msg_id: req.msg_id,
                }
            }
        }
    } else {
        let room = req.room.clone();
        shared
            .presence
            .modify(req.socket_id, |r| r.rooms.retain(|x| x != &room))
            .await?;
        GatewayControl::Leave {
            socket_id: req.socket_id,
            room: req.room.clone(),
            msg_id: req.msg_id,
        }
    };
    send_control(shared, &req.gateway, &control).await
}

/// Publishes a control message to one gateway.
pub(crate) async fn send_control(
    shared: &Shared,
    gateway: &messages::GatewayId,
    control: &GatewayControl,
) -> Result<(), EventError> {
    let body = payload::to_bus(control)?;
    shared
        .client
        .publish(subject::gateway_control(gateway), Bytes::from(body))
        .await?;
    Ok(())
}

/// Forwards clients' publish frames to `app.<route>` until the subscription ends.
pub(crate) async fn forward_upstream(shared: Arc<Shared>) {
    let subject = subject::upstream_wildcard(ClientKind::App);
    let mut sub = match shared
        .client
        .queue_subscribe(subject.clone(), subject::QUEUE_WS_API.into())
        .await
    {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(%subject, error = %e, "Subscribing to upstream frames failed.");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Ok(Subject::Upstream { route, .. }) = Subject::parse(msg.subject.as_str()) else {
            continue;
        };
        forward(&shared, &route, msg).await;
    }
}

async fn forward(shared: &Shared, route: &Route, msg: Message) {
    let Some(target) = subject::application(route) else {
        return;
    };
    let mut map = msg.headers.unwrap_or_default();
    crate::demo::relay(shared, route, &map, &msg.payload).await;
    let now = headers::now_micros();
    shared
        .metrics
        .hops
        .record(&map, headers::hop::SERVICE_IN, now);
    let msg_id = headers::get(&map, headers::MSG_ID)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let incoming = TraceContext::extract(&map);
    let process = MessageSpan::start(Operation::Process, &msg.subject, msg_id, incoming.as_ref());
    let publish = MessageSpan::start(
        Operation::Publish,
        &target,
        msg_id,
        process.context().as_ref(),
    );
    if let Some(context) = publish.context() {
        context.inject(&mut map);
    }
    headers::stamp_hop(&mut map, headers::hop::SERVICE_IN, now);
    headers::stamp_hop(&mut map, headers::hop::SERVICE_PUB, headers::now_micros());
    match shared
        .client
        .publish_with_headers(target, map, msg.payload)
        .await
    {
        Ok(()) => {
            shared.metrics.forwarded.inc();
        }
        Err(e) => {
            shared.metrics.event_errors.inc();
            publish.fail(&e.to_string());
            tracing::warn!(error = %e, trace_id = %publish.trace_id(), "Forwarding an upstream frame failed.");
        }
    }
}
