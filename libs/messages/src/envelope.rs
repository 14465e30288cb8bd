//! Typed header sets ("envelopes") of every bus message kind that carries headers: pushes
//! (services -> gateways), a client's publish (gateway -> services), session events and
//! room requests, delivery receipts (`ack`, `delivered`), heartbeat batches, and the
//! scheduler's close instruction on `ws.agent.<node>`.
//!
//! Each envelope is written with `to_headers` and read with `from_headers`, so a header
//! set is spelled out once, here, rather than by each service that builds or parses it.
//! Reading follows the contract in `docs/protocol.md` section 12: a header the contract lets
//! a sender leave out takes its documented default, a header the producer always sends is
//! required, and a value that is present but malformed is an error naming the header
//! (never silently replaced by a default).
//!
//! Per-hop `ws-hop` stamps are not part of an envelope: they accumulate as a message
//! travels, so each hop appends its own with [`crate::headers::stamp_hop`].
//! `ws.gw.<gateway>.ctl` and `ws.ctl` carry no headers; their typed body is
//! [`crate::payload::GatewayControl`].

use std::str::FromStr;

use async_nats::HeaderMap;

use crate::close::CloseCode;
use crate::frame::{BodyCodec, Flags, Route};
use crate::headers;
use crate::ids::{ClientKind, GatewayId, RoomId, SocketId, UserId};
use crate::trace::TraceContext;

/// Why a header map is not a valid envelope of the kind asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A header the contract requires is absent.
    #[error("missing header {0}")]
    Missing(&'static str),
    /// A header is present but its value is not what the contract allows.
    #[error("bad value {value:?} in header {name}")]
    Invalid {
        /// The header.
        name: &'static str,
        /// Its value as received.
        value: String,
    },
}

/// The value of the `ws-op` header: what a client-originated message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientOp {
    /// A publish frame (`ws.msg.<kind>.<route>`).
    Publish,
    /// A join request.
    Join,
    /// A leave request.
    Leave,
    /// A client's receipt for a push.
    Ack,
    /// The socket was accepted.
    Connect,
    /// The socket closed.
    Disconnect,
}

impl ClientOp {
    /// Every operation.
    pub const ALL: [ClientOp; 6] = [
        ClientOp::Publish,
        ClientOp::Join,
        ClientOp::Leave,
        ClientOp::Ack,
        ClientOp::Connect,
        ClientOp::Disconnect,
    ];

    /// The header value; for frame-driven operations it is the frame kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientOp::Publish => "publish",
            ClientOp::Join => "join",
            ClientOp::Leave => "leave",
            ClientOp::Ack => "ack",
            ClientOp::Connect => "connect",
            ClientOp::Disconnect => "disconnect",
        }
    }

    /// The operation a header value names.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == value)
    }
}

/// Who a client-originated message comes from: set by the gateway from the verified
/// session, never from anything the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The socket (`ws-socket`).
    pub socket_id: SocketId,
    /// Its owner (`ws-user`); for an agent, the node id.
    pub user_id: UserId,
    /// The gateway holding it (`ws-gateway`).
    pub gateway: GatewayId,
    /// Client kind (`ws-kind`).
    pub kind: ClientKind,
}

impl Origin {
    fn write(&self, map: &mut HeaderMap) {
        put(map, headers::SOCKET_ID, &self.socket_id.to_string());
        put(map, headers::USER_ID, self.user_id.as_str());
        put(map, headers::GATEWAY_ID, self.gateway.as_str());
        put(map, headers::CLIENT_KIND, self.kind.as_str());
    }

    fn read(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        Ok(Origin {
            socket_id: required(map, headers::SOCKET_ID)?,
            user_id: required(map, headers::USER_ID)?,
            gateway: required(map, headers::GATEWAY_ID)?,
            kind: required(map, headers::CLIENT_KIND)?,
        })
    }
}

/// A push, services -> gateways, on `ws.user.<user>`, `ws.agent.<node>`, `ws.room.<room>`,
/// `ws.all` or `ws.gw.<gateway>.push`. The subject picks the recipients; `sockets` names
/// them on `ws.gw.<gateway>.push`, and `exclude` leaves some out of a room or broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PushEnvelope {
    /// Push id (`ws-msg-id`); 0 means none (the header is left out) and rules out receipts.
    pub msg_id: u64,
    /// The push frame's route (`ws-route`); empty means none.
    pub route: Route,
    /// Body codec (`ws-codec`); `raw` when absent.
    pub codec: BodyCodec,
    /// The body is compressed end to end (`ws-compressed: 1`).
    pub compressed: bool,
    /// The sender wants a delivery receipt (`ws-receipt: 1`).
    pub receipt: bool,
    /// Unix ms after which the push must not be delivered (`ws-expires`).
    pub expires_at_ms: Option<u64>,
    /// Recipients on `ws.gw.<gateway>.push` (`ws-socket`, comma-separated).
    pub sockets: Vec<SocketId>,
    /// The room of a room push (`ws-room`).
    pub room: Option<RoomId>,
    /// Sockets to leave out (`ws-exclude`, comma-separated).
    pub exclude: Vec<SocketId>,
    /// Trace context (`traceparent`).
    pub trace: Option<TraceContext>,
    /// A push kept in history: its stream's epoch and its offset (`ws-epoch`,
    /// `ws-offset`; both or neither).
    pub position: Option<(u64, u64)>,
}

impl PushEnvelope {
    /// A push with this id, route and codec and nothing else set.
    pub fn new(msg_id: u64, route: Route, codec: BodyCodec) -> Self {
        PushEnvelope {
            msg_id,
            route,
            codec,
            ..Default::default()
        }
    }

    /// The push frame's flags: codec, compressed and receipt bits.
    pub fn flags(&self) -> Flags {
        Flags::new(self.codec)
            .with_compressed(self.compressed)
            .with_receipt(self.receipt)
    }

    /// The header set. `ws-codec` is always written; everything else only when set.
    pub fn to_headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        if self.msg_id != 0 {
            put(&mut map, headers::MSG_ID, &self.msg_id.to_string());
        }
        put(&mut map, headers::CODEC, self.codec.as_str());
        if !self.route.is_empty() {
            put(&mut map, headers::ROUTE, self.route.as_str());
        }
        put_flag(&mut map, headers::COMPRESSED, self.compressed);
        put_flag(&mut map, headers::RECEIPT, self.receipt);
        if let Some(at) = self.expires_at_ms {
            put(&mut map, headers::EXPIRES, &at.to_string());
        }
        if !self.sockets.is_empty() {
            put(&mut map, headers::SOCKET_ID, &socket_list(&self.sockets));
        }
        if let Some(room) = &self.room {
            put(&mut map, headers::ROOM, room.as_str());
        }
        if !self.exclude.is_empty() {
            put(&mut map, headers::EXCLUDE, &socket_list(&self.exclude));
        }
        if let Some((epoch, offset)) = self.position {
            put(&mut map, headers::EPOCH, &epoch.to_string());
            put(&mut map, headers::OFFSET, &offset.to_string());
        }
        if let Some(trace) = &self.trace {
            trace.inject(&mut map);
        }
        map
    }

    /// Reads a push. Every header is optional (a bare body is a raw push with id 0); a
    /// malformed one is an error. A malformed `traceparent` is ignored, as W3C asks.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        Ok(PushEnvelope {
            msg_id: optional(map, headers::MSG_ID)?.unwrap_or(0),
            route: optional(map, headers::ROUTE)?.unwrap_or_default(),
            codec: codec(map)?.unwrap_or(BodyCodec::Raw),
            compressed: flag(map, headers::COMPRESSED)?,
            receipt: flag(map, headers::RECEIPT)?,
            expires_at_ms: optional(map, headers::EXPIRES)?,
            sockets: sockets(map, headers::SOCKET_ID)?,
            room: optional(map, headers::ROOM)?,
            exclude: sockets(map, headers::EXCLUDE)?,
            trace: TraceContext::extract(map),
            position: position(map)?,
        })
    }
}

/// `ws-epoch` and `ws-offset`: both present and non-zero, or both absent.
fn position(map: &HeaderMap) -> Result<Option<(u64, u64)>, EnvelopeError> {
    let epoch: Option<u64> = optional(map, headers::EPOCH)?;
    let offset: Option<u64> = optional(map, headers::OFFSET)?;
    match (epoch, offset) {
        (None, None) => Ok(None),
        (Some(0), _) => Err(invalid(headers::EPOCH, "0")),
        (_, Some(0)) => Err(invalid(headers::OFFSET, "0")),
        (Some(e), Some(o)) => Ok(Some((e, o))),
        (Some(_), None) => Err(EnvelopeError::Missing(headers::OFFSET)),
        (None, Some(_)) => Err(EnvelopeError::Missing(headers::EPOCH)),
    }
}

/// The scheduler's instruction on `ws.agent.<node>` to close the node's agent sockets
/// (`ws-close: <close code>`, empty body) instead of delivering a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentClose {
    /// The close code the sockets are closed with.
    pub code: CloseCode,
}

impl AgentClose {
    /// Whether a message on the agent channel is a close instruction rather than a push.
    pub fn is_close(map: &HeaderMap) -> bool {
        map.get(headers::CLOSE).is_some()
    }

    /// The header set.
    pub fn to_headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        put(&mut map, headers::CLOSE, &self.code.code().to_string());
        map
    }

    /// Reads a close instruction; an unknown close code is an error.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        let value = get(map, headers::CLOSE).ok_or(EnvelopeError::Missing(headers::CLOSE))?;
        value
            .parse()
            .ok()
            .and_then(CloseCode::from_code)
            .map(|code| AgentClose { code })
            .ok_or_else(|| invalid(headers::CLOSE, value))
    }
}

/// A client's publish frame on the bus, gateway -> services (`ws.msg.<kind>.<route>`).
/// `ws-op` is always `publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamEnvelope {
    /// Who sent it.
    pub origin: Origin,
    /// The client's frame id (`ws-msg-id`); 0 means none.
    pub msg_id: u64,
    /// The frame's route (`ws-route`), never empty.
    pub route: Route,
    /// Body codec the client declared (`ws-codec`).
    pub codec: BodyCodec,
    /// The body is compressed end to end (`ws-compressed: 1`).
    pub compressed: bool,
    /// Trace context (`traceparent`).
    pub trace: Option<TraceContext>,
}

impl UpstreamEnvelope {
    /// The header set.
    pub fn to_headers(&self) -> HeaderMap {
        let mut map = client_headers(&self.origin, ClientOp::Publish, self.msg_id, self.trace);
        put(&mut map, headers::ROUTE, self.route.as_str());
        put(&mut map, headers::CODEC, self.codec.as_str());
        put_flag(&mut map, headers::COMPRESSED, self.compressed);
        map
    }

    /// Reads a publish. Origin, `ws-op: publish`, route and codec are required.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        let origin = Origin::read(map)?;
        expect_op(map, &[ClientOp::Publish])?;
        let route: Route = required(map, headers::ROUTE)?;
        if route.is_empty() {
            return Err(invalid(headers::ROUTE, ""));
        }
        Ok(UpstreamEnvelope {
            origin,
            msg_id: optional(map, headers::MSG_ID)?.unwrap_or(0),
            route,
            codec: codec(map)?.ok_or(EnvelopeError::Missing(headers::CODEC))?,
            compressed: flag(map, headers::COMPRESSED)?,
            trace: TraceContext::extract(map),
        })
    }
}

/// A session event or room request, gateway -> services (`ws.evt.<kind>.connect`,
/// `disconnect`, `join`, `leave`); the body is the event's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnvelope {
    /// The socket it is about.
    pub origin: Origin,
    /// `connect`, `disconnect`, `join` or `leave`.
    pub op: ClientOp,
    /// The client's frame id for join and leave (`ws-msg-id`); 0 means none.
    pub msg_id: u64,
    /// Trace context (`traceparent`) of a traced join or leave frame.
    pub trace: Option<TraceContext>,
}

impl SessionEnvelope {
    /// Operations a session envelope may carry.
    const OPS: [ClientOp; 4] = [
        ClientOp::Connect,
        ClientOp::Disconnect,
        ClientOp::Join,
        ClientOp::Leave,
    ];

    /// The header set.
    pub fn to_headers(&self) -> HeaderMap {
        client_headers(&self.origin, self.op, self.msg_id, self.trace)
    }

    /// Reads a session event; origin and `ws-op` are required.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        let origin = Origin::read(map)?;
        let op = expect_op(map, &Self::OPS)?;
        Ok(SessionEnvelope {
            origin,
            op,
            msg_id: optional(map, headers::MSG_ID)?.unwrap_or(0),
            trace: TraceContext::extract(map),
        })
    }
}

/// A client's receipt for a push, gateway -> services (`ws.evt.<kind>.ack`, empty body).
/// `ws-op` is always `ack`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckEnvelope {
    /// The socket that acknowledged.
    pub origin: Origin,
    /// The acknowledged push's id (`ws-msg-id`); 0 when the client's ack named none.
    pub push_id: u64,
    /// Trace context (`traceparent`).
    pub trace: Option<TraceContext>,
}

impl AckEnvelope {
    /// The header set.
    pub fn to_headers(&self) -> HeaderMap {
        client_headers(&self.origin, ClientOp::Ack, self.push_id, self.trace)
    }

    /// Reads a receipt; origin and `ws-op: ack` are required.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        let origin = Origin::read(map)?;
        expect_op(map, &[ClientOp::Ack])?;
        Ok(AckEnvelope {
            origin,
            push_id: optional(map, headers::MSG_ID)?.unwrap_or(0),
            trace: TraceContext::extract(map),
        })
    }
}

/// A gateway's report that it handed a receipt-requesting push to local sockets,
/// gateway -> services (`ws.evt.<kind>.delivered`, empty body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredEnvelope {
    /// The push (`ws-msg-id`).
    pub push_id: u64,
    /// How many local sockets got it (`ws-count`).
    pub count: u64,
    /// The reporting gateway (`ws-gateway`).
    pub gateway: GatewayId,
}

impl DeliveredEnvelope {
    /// The header set.
    pub fn to_headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        put(&mut map, headers::MSG_ID, &self.push_id.to_string());
        put(&mut map, headers::COUNT, &self.count.to_string());
        put(&mut map, headers::GATEWAY_ID, self.gateway.as_str());
        map
    }

    /// Reads a delivery report; every header is required.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        Ok(DeliveredEnvelope {
            push_id: required(map, headers::MSG_ID)?,
            count: required(map, headers::COUNT)?,
            gateway: required(map, headers::GATEWAY_ID)?,
        })
    }
}

/// A gateway's presence batch (`ws.evt.<kind>.heartbeat`); the body is a
/// [`crate::payload::HeartbeatBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatEnvelope {
    /// The gateway vouching for its sockets (`ws-gateway`).
    pub gateway: GatewayId,
}

impl HeartbeatEnvelope {
    /// The header set.
    pub fn to_headers(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        put(&mut map, headers::GATEWAY_ID, self.gateway.as_str());
        map
    }

    /// Reads a heartbeat batch's headers.
    pub fn from_headers(map: &HeaderMap) -> Result<Self, EnvelopeError> {
        Ok(HeartbeatEnvelope {
            gateway: required(map, headers::GATEWAY_ID)?,
        })
    }
}

fn client_headers(
    origin: &Origin,
    op: ClientOp,
    msg_id: u64,
    trace: Option<TraceContext>,
) -> HeaderMap {
    let mut map = HeaderMap::new();
    origin.write(&mut map);
    put(&mut map, headers::OPERATION, op.as_str());
    if msg_id != 0 {
        put(&mut map, headers::MSG_ID, &msg_id.to_string());
    }
    if let Some(trace) = trace {
        trace.inject(&mut map);
    }
    map
}

/// Every value an envelope writes comes from a validated id, a route, a number or a fixed
/// name, none of which can hold the CR or LF that `headers::set` refuses, so the error
/// cannot happen and is not worth a `Result` on every `to_headers`.
fn put(map: &mut HeaderMap, name: &'static str, value: &str) {
    let _ = headers::set(map, name, value);
}

fn put_flag(map: &mut HeaderMap, name: &'static str, on: bool) {
    if on {
        put(map, name, "1");
    }
}

fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers::get(map, name)
}

fn invalid(name: &'static str, value: &str) -> EnvelopeError {
    EnvelopeError::Invalid {
        name,
        value: value.to_owned(),
    }
}

fn optional<T: FromStr>(map: &HeaderMap, name: &'static str) -> Result<Option<T>, EnvelopeError> {
    get(map, name)
        .map(|v| v.parse().map_err(|_| invalid(name, v)))
        .transpose()
}

fn required<T: FromStr>(map: &HeaderMap, name: &'static str) -> Result<T, EnvelopeError> {
    optional(map, name)?.ok_or(EnvelopeError::Missing(name))
}

fn codec(map: &HeaderMap) -> Result<Option<BodyCodec>, EnvelopeError> {
    get(map, headers::CODEC)
        .map(|v| BodyCodec::parse(v).ok_or_else(|| invalid(headers::CODEC, v)))
        .transpose()
}

/// A flag is present with value `1` or absent.
fn flag(map: &HeaderMap, name: &'static str) -> Result<bool, EnvelopeError> {
    match get(map, name) {
        None => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(invalid(name, other)),
    }
}

fn expect_op(map: &HeaderMap, allowed: &[ClientOp]) -> Result<ClientOp, EnvelopeError> {
    let value = get(map, headers::OPERATION).ok_or(EnvelopeError::Missing(headers::OPERATION))?;
    ClientOp::parse(value)
        .filter(|op| allowed.contains(op))
        .ok_or_else(|| invalid(headers::OPERATION, value))
}

fn socket_list(ids: &[SocketId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Comma-separated decimal socket ids; absent or empty is an empty list.
fn sockets(map: &HeaderMap, name: &'static str) -> Result<Vec<SocketId>, EnvelopeError> {
    let Some(value) = get(map, name) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| invalid(name, value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn trace() -> TraceContext {
        TraceContext::parse_traceparent(TRACE).unwrap()
    }

    fn origin() -> Origin {
        Origin {
            socket_id: SocketId(137_465_797_017_604_096),
            user_id: UserId::new("user:42@tenant").unwrap(),
            gateway: GatewayId::new("gw-1").unwrap(),
            kind: ClientKind::App,
        }
    }

    /// A header map spelled with literal names, as a sender in another language would
    /// write it: renaming a header constant breaks these tests.
    fn literal(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, *value);
        }
        map
    }

    /// The header map as sorted `(name, value)` pairs, for comparing with literals.
    fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = map
            .iter()
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |v| (name.to_string(), v.as_str().to_owned()))
            })
            .collect();
        out.sort();
        out
    }

    fn sorted(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        out.sort();
        out
    }

    fn full_push() -> PushEnvelope {
        PushEnvelope {
            msg_id: 91,
            route: Route::new("chat.msg").unwrap(),
            codec: BodyCodec::MsgPack,
            compressed: true,
            receipt: true,
            expires_at_ms: Some(1_700_000_000_000),
            sockets: vec![SocketId(17), SocketId(42)],
            room: Some(RoomId::new("chat.lobby").unwrap()),
            exclude: vec![SocketId(5)],
            trace: Some(trace()),
            position: Some((3, 9)),
        }
    }

    #[test]
    fn a_push_position_needs_both_headers_and_no_zeros() {
        let mut map = HeaderMap::new();
        put(&mut map, headers::EPOCH, "3");
        assert!(PushEnvelope::from_headers(&map).is_err());
        put(&mut map, headers::OFFSET, "0");
        assert!(PushEnvelope::from_headers(&map).is_err());
        put(&mut map, headers::OFFSET, "4");
        assert_eq!(
            PushEnvelope::from_headers(&map).unwrap().position,
            Some((3, 4))
        );
        put(&mut map, headers::EPOCH, "x");
        assert!(PushEnvelope::from_headers(&map).is_err());
    }

    #[test]
    fn push_round_trips() {
        for push in [
            full_push(),
            PushEnvelope::default(),
            PushEnvelope::new(7, Route::empty(), BodyCodec::Json),
        ] {
            assert_eq!(PushEnvelope::from_headers(&push.to_headers()), Ok(push));
        }
    }

    #[test]
    fn push_headers_have_the_documented_names() {
        assert_eq!(
            pairs(&full_push().to_headers()),
            sorted(&[
                ("ws-msg-id", "91"),
                ("ws-codec", "msgpack"),
                ("ws-route", "chat.msg"),
                ("ws-compressed", "1"),
                ("ws-receipt", "1"),
                ("ws-expires", "1700000000000"),
                ("ws-socket", "17,42"),
                ("ws-room", "chat.lobby"),
                ("ws-exclude", "5"),
                ("ws-epoch", "3"),
                ("ws-offset", "9"),
                ("traceparent", TRACE),
            ])
        );
        // Only the codec is always written; a raw push with no id is one header.
        assert_eq!(
            pairs(&PushEnvelope::default().to_headers()),
            sorted(&[("ws-codec", "raw")])
        );
    }

    #[test]
    fn push_reads_a_literal_header_map_with_defaults_for_absent_headers() {
        let map = literal(&[
            ("ws-msg-id", "4242"),
            ("ws-route", "test.push"),
            ("ws-codec", "json"),
            ("ws-receipt", "1"),
            ("ws-socket", "1, 2,3"),
            ("ws-exclude", "9"),
            ("ws-hop", "svc-pub=1"),
        ]);
        let push = PushEnvelope::from_headers(&map).unwrap();
        assert_eq!(push.msg_id, 4242);
        assert_eq!(push.route.as_str(), "test.push");
        assert_eq!(push.flags(), Flags::new(BodyCodec::Json).with_receipt(true));
        assert_eq!(push.sockets, vec![SocketId(1), SocketId(2), SocketId(3)]);
        assert_eq!(push.exclude, vec![SocketId(9)]);
        assert_eq!(push.expires_at_ms, None);
        assert_eq!(push.room, None);
        assert_eq!(push.trace, None);

        let bare = PushEnvelope::from_headers(&HeaderMap::new()).unwrap();
        assert_eq!(bare, PushEnvelope::new(0, Route::empty(), BodyCodec::Raw));
    }

    #[test]
    fn malformed_push_headers_are_named() {
        for (name, value) in [
            ("ws-msg-id", "x"),
            ("ws-route", "a..b"),
            ("ws-codec", "xml"),
            ("ws-compressed", "yes"),
            ("ws-receipt", "true"),
            ("ws-expires", "-1"),
            ("ws-socket", "1,x"),
            ("ws-room", "*"),
            ("ws-exclude", "+3"),
        ] {
            let got = PushEnvelope::from_headers(&literal(&[(name, value)]));
            match got {
                Err(EnvelopeError::Invalid { name: n, value: v }) => {
                    assert_eq!((n, v.as_str()), (name, value));
                }
                other => panic!("{name}: {value}: {other:?}"),
            }
        }
        // W3C: a malformed traceparent is dropped, not fatal.
        let map = literal(&[("traceparent", "garbage")]);
        assert_eq!(PushEnvelope::from_headers(&map).unwrap().trace, None);
    }

    #[test]
    fn agent_close_round_trips_and_refuses_unknown_codes() {
        let close = AgentClose {
            code: CloseCode::Revoked,
        };
        let map = close.to_headers();
        assert!(AgentClose::is_close(&map));
        assert_eq!(AgentClose::from_headers(&map), Ok(close));
        let wire = CloseCode::Revoked.code().to_string();
        assert_eq!(pairs(&map), sorted(&[("ws-close", wire.as_str())]));
        assert_eq!(
            AgentClose::from_headers(&literal(&[("ws-close", "4505")])),
            Ok(AgentClose {
                code: CloseCode::from_code(4505).unwrap()
            })
        );
        assert!(!AgentClose::is_close(&full_push().to_headers()));
        assert_eq!(
            AgentClose::from_headers(&HeaderMap::new()),
            Err(EnvelopeError::Missing("ws-close"))
        );
        assert_eq!(
            AgentClose::from_headers(&literal(&[("ws-close", "1")])),
            Err(EnvelopeError::Invalid {
                name: "ws-close",
                value: "1".into()
            })
        );
    }

    fn upstream() -> UpstreamEnvelope {
        UpstreamEnvelope {
            origin: origin(),
            msg_id: 42,
            route: Route::new("orders.create").unwrap(),
            codec: BodyCodec::MsgPack,
            compressed: true,
            trace: Some(trace()),
        }
    }

    #[test]
    fn upstream_round_trips_with_the_documented_names() {
        let up = upstream();
        let map = up.to_headers();
        assert_eq!(UpstreamEnvelope::from_headers(&map), Ok(up.clone()));
        assert_eq!(
            pairs(&map),
            sorted(&[
                ("ws-socket", "137465797017604096"),
                ("ws-user", "user:42@tenant"),
                ("ws-gateway", "gw-1"),
                ("ws-kind", "app"),
                ("ws-op", "publish"),
                ("ws-msg-id", "42"),
                ("ws-route", "orders.create"),
                ("ws-codec", "msgpack"),
                ("ws-compressed", "1"),
                ("traceparent", TRACE),
            ])
        );
        let plain = UpstreamEnvelope {
            msg_id: 0,
            compressed: false,
            trace: None,
            ..up
        };
        assert_eq!(
            UpstreamEnvelope::from_headers(&plain.to_headers()),
            Ok(plain)
        );
    }

    #[test]
    fn upstream_requires_what_the_gateway_always_sends() {
        let full = [
            ("ws-socket", "17"),
            ("ws-user", "node-1"),
            ("ws-gateway", "gw-1"),
            ("ws-kind", "agent"),
            ("ws-op", "publish"),
            ("ws-route", "agent.register"),
            ("ws-codec", "msgpack"),
        ];
        let up = UpstreamEnvelope::from_headers(&literal(&full)).unwrap();
        assert_eq!(up.origin.kind, ClientKind::Agent);
        assert_eq!(up.origin.user_id.as_str(), "node-1");
        assert_eq!(up.msg_id, 0);
        for i in 0..full.len() {
            let mut partial = full.to_vec();
            let (name, _) = partial.remove(i);
            assert_eq!(
                UpstreamEnvelope::from_headers(&literal(&partial)),
                Err(EnvelopeError::Missing(
                    headers::ALL.into_iter().find(|n| *n == name).unwrap()
                )),
                "{name}"
            );
        }
        let mut wrong_op = full.to_vec();
        wrong_op[4] = ("ws-op", "ack");
        assert!(matches!(
            UpstreamEnvelope::from_headers(&literal(&wrong_op)),
            Err(EnvelopeError::Invalid { name: "ws-op", .. })
        ));
    }

    #[test]
    fn session_events_round_trip() {
        for op in [
            ClientOp::Connect,
            ClientOp::Disconnect,
            ClientOp::Join,
            ClientOp::Leave,
        ] {
            let env = SessionEnvelope {
                origin: origin(),
                op,
                msg_id: if op == ClientOp::Join { 8 } else { 0 },
                trace: (op == ClientOp::Join).then(trace),
            };
            assert_eq!(SessionEnvelope::from_headers(&env.to_headers()), Ok(env));
        }
        let connect = literal(&[
            ("ws-socket", "17"),
            ("ws-user", "carol"),
            ("ws-gateway", "gw-up"),
            ("ws-kind", "app"),
            ("ws-op", "connect"),
        ]);
        let env = SessionEnvelope::from_headers(&connect).unwrap();
        assert_eq!(env.op, ClientOp::Connect);
        assert_eq!(env.origin.socket_id, SocketId(17));
        assert_eq!(pairs(&env.to_headers()), pairs(&connect));
        let publish = upstream().to_headers();
        assert!(matches!(
            SessionEnvelope::from_headers(&publish),
            Err(EnvelopeError::Invalid { name: "ws-op", .. })
        ));
    }

    #[test]
    fn receipts_round_trip_with_the_documented_names() {
        let ack = AckEnvelope {
            origin: origin(),
            push_id: 4242,
            trace: Some(trace()),
        };
        let map = ack.to_headers();
        assert_eq!(AckEnvelope::from_headers(&map), Ok(ack));
        assert_eq!(headers::get(&map, "ws-op"), Some("ack"));
        assert_eq!(headers::get(&map, "ws-msg-id"), Some("4242"));

        let delivered = DeliveredEnvelope {
            push_id: 91,
            count: 1500,
            gateway: GatewayId::new("gw-2").unwrap(),
        };
        let map = delivered.to_headers();
        assert_eq!(DeliveredEnvelope::from_headers(&map), Ok(delivered));
        assert_eq!(
            pairs(&map),
            sorted(&[
                ("ws-msg-id", "91"),
                ("ws-count", "1500"),
                ("ws-gateway", "gw-2")
            ])
        );
        assert_eq!(
            DeliveredEnvelope::from_headers(&literal(&[
                ("ws-msg-id", "91"),
                ("ws-gateway", "gw-2")
            ])),
            Err(EnvelopeError::Missing("ws-count"))
        );
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = HeartbeatEnvelope {
            gateway: GatewayId::new("gw-3").unwrap(),
        };
        let map = hb.to_headers();
        assert_eq!(pairs(&map), sorted(&[("ws-gateway", "gw-3")]));
        assert_eq!(HeartbeatEnvelope::from_headers(&map), Ok(hb));
    }

    #[test]
    fn ops_round_trip() {
        for op in ClientOp::ALL {
            assert_eq!(ClientOp::parse(op.as_str()), Some(op));
        }
        assert_eq!(ClientOp::parse("push"), None);
    }
}
