//! How a client's frame becomes a bus message: the subject, the headers naming its origin
//! (and the trace and the gateway's receiving hop), and the body, untouched. Pure
//! functions of the frame and the session's identity, so the rules are tested without a
//! connection; the actor (`session.rs`) decides when to send what they build.

use async_nats::HeaderMap;
use bytes::Bytes;
use messages::envelope::{AckEnvelope, ClientOp, Origin, SessionEnvelope, UpstreamEnvelope};
use messages::payload::{self, RoomRequest};
use messages::subject::{self, Event};
use messages::{ErrorCode, Frame, FrameKind, RoomId, TraceContext, headers};
use servicekit::telemetry::{MessageSpan, Operation};

/// A message for the bus.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// Subject.
    pub subject: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub payload: Bytes,
}

/// Why a frame is answered with an error instead of being sent on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Code for the error frame.
    pub code: ErrorCode,
    /// Detail for the client.
    pub message: String,
}

/// A publish frame: to `ws.msg.<kind>.<route>`, with the upstream envelope.
pub(crate) fn publish(origin: Origin, frame: Frame) -> Result<Upstream, Refusal> {
    let Some(subject) = subject::upstream(origin.kind, &frame.route) else {
        return Err(Refusal {
            code: ErrorCode::BadRoute,
            message: "publish needs a route".to_owned(),
        });
    };
    let envelope = UpstreamEnvelope {
        origin,
        msg_id: frame.msg_id,
        codec: frame.flags.codec(),
        compressed: frame.flags.compressed(),
        trace: publish_trace(&frame, &subject),
        route: frame.route,
    };
    Ok(Upstream {
        subject,
        headers: stamped_in(envelope.to_headers()),
        payload: frame.body,
    })
}

/// A client's ack of a push that asked for a receipt: an ack event naming the push.
pub(crate) fn ack(origin: Origin, frame: &Frame) -> Upstream {
    let subject = subject::event(origin.kind, Event::Ack);
    let receipt = AckEnvelope {
        origin,
        push_id: frame.msg_id,
        trace: publish_trace(frame, &subject),
    };
    Upstream {
        subject,
        headers: stamped_in(receipt.to_headers()),
        payload: Bytes::new(),
    }
}

/// A join or leave frame: the request event the services answer with a control message.
/// Returns the event (join or leave) with the message.
pub(crate) fn room_request(origin: Origin, frame: &Frame) -> Result<(Event, Upstream), Refusal> {
    let room = RoomId::new(frame.route.as_str()).map_err(|e| Refusal {
        code: ErrorCode::BadRoute,
        message: format!("{} needs a room in the route: {e}", frame.kind),
    })?;
    let (event, op) = if frame.kind == FrameKind::Join {
        (Event::Join, ClientOp::Join)
    } else {
        (Event::Leave, ClientOp::Leave)
    };
    let subject = subject::event(origin.kind, event);
    let request = RoomRequest {
        socket_id: origin.socket_id,
        user_id: origin.user_id.clone(),
        gateway: origin.gateway.clone(),
        room,
        msg_id: frame.msg_id,
    };
    let envelope = SessionEnvelope {
        origin,
        op,
        msg_id: frame.msg_id,
        trace: publish_trace(frame, &subject),
    };
    let mut map = envelope.to_headers();
    // The room, for services that route on headers (docs/protocol.md 12.3); the value is a
    // validated room id, so `set` cannot fail.
    let _ = headers::set(&mut map, headers::ROOM, request.room.as_str());
    let body = payload::to_bus(&request).map_err(|e| Refusal {
        code: ErrorCode::Internal,
        message: e.to_string(),
    })?;
    Ok((
        event,
        Upstream {
            subject,
            headers: stamped_in(map),
            payload: Bytes::from(body),
        },
    ))
}

/// The room a join or leave frame names, if it is a valid room id.
pub(crate) fn room_of(frame: &Frame) -> Option<RoomId> {
    RoomId::new(frame.route.as_str()).ok()
}

/// The trace context for a client frame going to `subject`: the publish span's when
/// exporting (a child of the client's context if the frame carried one, else a new trace
/// sampled here), otherwise the client's context unchanged.
fn publish_trace(frame: &Frame, subject: &str) -> Option<TraceContext> {
    MessageSpan::start(
        Operation::Publish,
        subject,
        frame.msg_id,
        frame.trace.as_ref(),
    )
    .context()
}

/// Stamps the gateway's receiving hop on the headers of a client frame.
fn stamped_in(mut map: HeaderMap) -> HeaderMap {
    headers::stamp_hop(&mut map, headers::hop::GATEWAY_IN, headers::now_micros());
    map
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use messages::{BodyCodec, ClientKind, GatewayId, Route, SocketId, UserId};

    use super::*;

    fn origin(kind: ClientKind) -> Origin {
        Origin {
            socket_id: SocketId(42),
            user_id: UserId::new("ada").unwrap(),
            gateway: GatewayId::new("gw-1").unwrap(),
            kind,
        }
    }

    #[test]
    fn a_publish_goes_to_its_kinds_subject_with_its_origin_and_the_body_untouched() {
        let frame = Frame::new(FrameKind::Publish)
            .with_msg_id(9)
            .with_route(Route::new("chat.send").unwrap())
            .with_body(BodyCodec::Json, Bytes::from_static(b"{}"));
        let up = publish(origin(ClientKind::Agent), frame).unwrap();
        assert_eq!(
            up.subject,
            subject::upstream(ClientKind::Agent, &Route::new("chat.send").unwrap()).unwrap()
        );
        assert_eq!(&up.payload[..], b"{}");
        let envelope = UpstreamEnvelope::from_headers(&up.headers).unwrap();
        assert_eq!(envelope.origin, origin(ClientKind::Agent));
        assert_eq!((envelope.msg_id, envelope.codec), (9, BodyCodec::Json));
        assert!(
            up.headers.get(headers::HOP).is_some(),
            "the receiving hop is stamped"
        );
    }

    #[test]
    fn a_publish_without_a_route_is_refused_as_a_bad_route() {
        let frame = Frame::new(FrameKind::Publish).with_msg_id(3);
        assert_eq!(
            publish(origin(ClientKind::App), frame).unwrap_err().code,
            ErrorCode::BadRoute
        );
    }

    #[test]
    fn a_join_names_its_room_in_the_body_and_the_room_header() {
        let frame = Frame::new(FrameKind::Join)
            .with_msg_id(5)
            .with_route(Route::new("chat.lobby").unwrap());
        let (event, up) = room_request(origin(ClientKind::App), &frame).unwrap();
        assert_eq!(event, Event::Join);
        assert_eq!(up.subject, subject::event(ClientKind::App, Event::Join));
        let request: RoomRequest = payload::from_bus(&up.payload).unwrap();
        assert_eq!((request.room.as_str(), request.msg_id), ("chat.lobby", 5));
        assert_eq!(request.socket_id, SocketId(42));
        assert_eq!(
            up.headers.get(headers::ROOM).map(|v| v.as_str()),
            Some("chat.lobby")
        );
        let leave = Frame::new(FrameKind::Leave).with_route(Route::new("chat.lobby").unwrap());
        assert_eq!(
            room_request(origin(ClientKind::App), &leave).unwrap().0,
            Event::Leave
        );
    }

    #[test]
    fn a_join_without_a_room_is_refused() {
        let frame = Frame::new(FrameKind::Join).with_msg_id(5);
        assert_eq!(
            room_request(origin(ClientKind::App), &frame)
                .unwrap_err()
                .code,
            ErrorCode::BadRoute
        );
    }

    #[test]
    fn an_ack_names_the_push_it_acknowledges() {
        let frame = Frame::new(FrameKind::Ack).with_msg_id(77);
        let up = ack(origin(ClientKind::App), &frame);
        assert_eq!(up.subject, subject::event(ClientKind::App, Event::Ack));
        assert_eq!(AckEnvelope::from_headers(&up.headers).unwrap().push_id, 77);
    }
}
