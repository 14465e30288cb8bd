//! A fake gateway on the bus, for tests of services that consume agent traffic (the
//! scheduler): what a gateway publishes for an agent's session and publish frames, and
//! the pushes a service sends to an agent, decoded. Subjects and headers come from
//! `libs/messages`, so these tests break when the contract changes, not when a literal
//! drifts.

use std::time::Duration;

use futures_util::StreamExt;
use messages::envelope::{Origin, PushEnvelope, UpstreamEnvelope};
use messages::fleet;
use messages::payload::{self, SessionEvent};
use messages::subject::{self, Event};
use messages::{BodyCodec, ClientKind, GatewayId, Route, SocketId, UserId};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The gateway id the fake gateway uses.
pub const GATEWAY: &str = "gw-x";

/// How long [`next_push`] waits.
pub const WAIT: Duration = Duration::from_secs(15);

fn node_id(node: &str) -> UserId {
    UserId::new(node).unwrap_or_else(|e| panic!("node id {node:?}: {e}"))
}

fn gateway() -> GatewayId {
    GatewayId::new(GATEWAY).unwrap_or_else(|e| panic!("gateway id: {e}"))
}

/// Publishes what a gateway puts on the bus for an agent's publish frame on `route`
/// (MessagePack body, no trace context), and flushes.
pub async fn publish_upstream<T: Serialize>(
    bus: &async_nats::Client,
    node: &str,
    socket: u64,
    route: &str,
    body: &T,
) {
    let route = Route::new(route).unwrap_or_else(|e| panic!("route {route:?}: {e}"));
    let envelope = UpstreamEnvelope {
        origin: Origin {
            socket_id: SocketId(socket),
            user_id: node_id(node),
            gateway: gateway(),
            kind: ClientKind::Agent,
        },
        msg_id: 0,
        route: route.clone(),
        codec: BodyCodec::MsgPack,
        compressed: false,
        trace: None,
    };
    let subject = subject::upstream(ClientKind::Agent, &route)
        .unwrap_or_else(|| panic!("no upstream subject for {route:?}"));
    let body = payload::to_bus(body).unwrap_or_else(|e| panic!("encoding the body: {e}"));
    bus.publish_with_headers(subject, envelope.to_headers(), body.into())
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    bus.flush().await.unwrap_or_else(|e| panic!("flush: {e}"));
}

/// Publishes a gateway's session event (`connect`, `disconnect`) for an agent socket.
pub async fn session_event(bus: &async_nats::Client, node: &str, socket: u64, event: Event) {
    let e = SessionEvent {
        socket_id: SocketId(socket),
        user_id: node_id(node),
        kind: ClientKind::Agent,
        gateway: gateway(),
        at_ms: 1,
        allowed_rooms: vec![],
        close_code: None,
        reason: None,
        via: None,
        rooms: vec![],
        connected_at_ms: None,
    };
    let body = payload::to_bus(&e).unwrap_or_else(|e| panic!("encoding the event: {e}"));
    bus.publish(subject::event(ClientKind::Agent, event), body.into())
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
}

/// The gateway's connect event and the agent's register (hostname `edge-1`, version
/// `0.1.0`, label `region=eu`, address `10.0.0.1`).
pub async fn register(bus: &async_nats::Client, node: &str, socket: u64) {
    session_event(bus, node, socket, Event::Connect).await;
    let reg = fleet::Register {
        node_id: node.into(),
        hostname: "edge-1".into(),
        version: "0.1.0".into(),
        labels: [("region".to_owned(), "eu".to_owned())].into(),
        addresses: vec!["10.0.0.1".into()],
        configs: Default::default(),
    };
    publish_upstream(bus, node, socket, fleet::up::REGISTER, &reg).await;
}

/// Subscribes to `node`'s agent channel (what a gateway holding its socket receives).
pub async fn agent_pushes(bus: &async_nats::Client, node: &str) -> async_nats::Subscriber {
    bus.subscribe(subject::agent(&node_id(node)))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"))
}

/// The next push with `route` on an agent channel subscription, skipping pushes on other
/// routes; checks that it is a MessagePack signed command for that route and returns its
/// body. Fails the test after [`WAIT`].
pub async fn next_push<T: DeserializeOwned>(sub: &mut async_nats::Subscriber, route: &str) -> T {
    loop {
        let msg = tokio::time::timeout(WAIT, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no {route} push within {WAIT:?}"))
            .unwrap_or_else(|| panic!("subscription ended waiting for {route}"));
        let headers = msg
            .headers
            .as_ref()
            .unwrap_or_else(|| panic!("a push without headers"));
        let push = PushEnvelope::from_headers(headers).unwrap_or_else(|e| panic!("{e}"));
        if push.route.as_str() != route {
            continue;
        }
        assert_eq!(push.codec, BodyCodec::MsgPack);
        let envelope = messages::command::peek(&msg.payload)
            .unwrap_or_else(|| panic!("{route}: not a signed command"));
        assert_eq!(envelope.route, route);
        return payload::from_bus(&envelope.body).unwrap_or_else(|e| panic!("{route} body: {e}"));
    }
}
