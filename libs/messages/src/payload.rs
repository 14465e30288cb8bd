//! Typed bodies: the few client-frame bodies the gateway itself writes or reads (welcome,
//! heartbeat ack, error, reconnect, hello) and the payloads services exchange on the bus.
//!
//! Client-frame bodies use whichever codec the client asked for (MessagePack maps with
//! string keys, or JSON). Bus payloads are always MessagePack maps with string keys
//! (`rmp_serde::to_vec_named`), so a service in another language can read them and fields
//! can be added without breaking older readers. Application bodies (publish, push) are
//! never described here: they are opaque to the whole system.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::frame::BodyCodec;
use crate::ids::{ClientKind, GatewayId, RoomId, SocketId, UserId};

/// Why a body could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// MessagePack encoding failed.
    #[error("msgpack encode: {0}")]
    MsgPackEncode(#[from] rmp_serde::encode::Error),
    /// MessagePack decoding failed.
    #[error("msgpack decode: {0}")]
    MsgPackDecode(#[from] rmp_serde::decode::Error),
    /// JSON failed either way.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The raw codec declares no structure, so there is nothing typed to decode.
    #[error("raw bodies carry no typed payload")]
    RawCodec,
}

/// Encodes a typed body in `codec` (raw falls back to MessagePack, the default).
pub fn encode_body<T: Serialize>(codec: BodyCodec, value: &T) -> Result<Vec<u8>, PayloadError> {
    match codec {
        BodyCodec::Json => Ok(serde_json::to_vec(value)?),
        BodyCodec::MsgPack | BodyCodec::Raw => Ok(rmp_serde::to_vec_named(value)?),
    }
}

/// Decodes a typed body in `codec`.
pub fn decode_body<T: DeserializeOwned>(codec: BodyCodec, body: &[u8]) -> Result<T, PayloadError> {
    match codec {
        BodyCodec::Json => Ok(serde_json::from_slice(body)?),
        BodyCodec::MsgPack => Ok(rmp_serde::from_slice(body)?),
        BodyCodec::Raw => Err(PayloadError::RawCodec),
    }
}

/// Encodes a bus payload (MessagePack, named fields).
pub fn to_bus<T: Serialize>(value: &T) -> Result<Vec<u8>, PayloadError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Decodes a bus payload.
pub fn from_bus<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PayloadError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Heartbeat parameters, sent in the welcome frame (seed 002's dynamic heartbeat).
///
/// The client beats every `interval_ms`; after `grow_after` consecutive on-time beats the
/// gateway grows the interval by `step_ms` up to `max_ms`, and after a late beat it drops
/// back to `base_ms`. Each heartbeat ack carries the interval to use next, so a client only
/// ever follows the latest ack. A session with no frame for `interval + grace_ms` is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatParams {
    /// Starting and fallback interval.
    pub base_ms: u32,
    /// Growth per step.
    pub step_ms: u32,
    /// Ceiling.
    pub max_ms: u32,
    /// On-time beats before each growth step.
    pub grow_after: u32,
    /// Slack after the interval before the session is closed.
    pub grace_ms: u32,
}

/// Body of a welcome frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The socket id this connection is known by everywhere.
    pub socket_id: SocketId,
    /// The user the token named.
    pub user_id: UserId,
    /// Instance name of the gateway holding the connection.
    pub gateway: GatewayId,
    /// Heartbeat parameters.
    pub heartbeat: HeartbeatParams,
    /// Largest body the gateway accepts.
    pub max_body_bytes: u32,
    /// Gateway clock, Unix milliseconds, so clients can estimate skew.
    pub server_time_ms: u64,
    /// Present when the client asked to recover its user stream (`since=` at connect):
    /// whether it did; the replayed pushes follow the welcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
}

/// Body of a heartbeat ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// Interval to use until the next ack.
    pub next_interval_ms: u32,
}

/// Body of an error frame; the frame's message id names the failed message (0 if none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A [`crate::close::ErrorCode`] value.
    pub code: u16,
    /// Human-readable detail for logs, not for parsing.
    pub message: String,
}

/// What a gateway replica publishes about itself every few seconds on
/// [`crate::subject::gateway_stats`] (encoded with [`to_bus`]). Counters are totals since the
/// replica started, so a reader computes rates from two envelopes and a restart shows as
/// a counter going down. Readers keep the latest per `instance` and forget it after a few
/// missed periods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStats {
    /// The replica's instance id.
    pub instance: GatewayId,
    /// Whether it would accept an upgrade now (its `/readyz`).
    pub ready: bool,
    /// The worker id it leases, if any.
    #[serde(default)]
    pub worker_id: Option<u16>,
    /// Open application (user) connections.
    pub app_connections: u64,
    /// Open agent connections.
    pub agent_connections: u64,
    /// Connections closed as slow consumers (close 4002), total.
    pub slow_consumer_closes: u64,
    /// Push frames handed to clients' queues, total.
    pub pushes_delivered: u64,
    /// Client messages handed to NATS, total.
    pub published: u64,
    /// Milliseconds between two envelopes from this replica.
    pub interval_ms: u64,
    /// When it was sent, unix ms (the sender's clock).
    pub sent_at_ms: u64,
}

/// Body of a reconnect frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnect {
    /// Wait this long before reconnecting (spreads a drain's reconnects over a window).
    pub delay_ms: u32,
    /// Why.
    pub reason: String,
}

/// Body of the optional hello frame a client sends first (for logs and metrics only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Hello {
    /// Client library name and version, for logs and metrics.
    #[serde(default)]
    pub client: String,
}

/// Body of a `join` frame that asks for recovery (ADR 0017): the client's last position in
/// the room's history stream. An empty body asks for no recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinSince {
    /// The stream's epoch as the client last saw it.
    pub epoch: u64,
    /// The offset of the last push the client has from that stream.
    pub offset: u64,
}

/// Body of the `ack` answering a join that asked for recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// `true`: every push the client missed follows this ack, in order, then the live
    /// stream, with no duplicates. `false`: what was missed cannot be replayed (another
    /// epoch, or more than the window); the client should reload its state.
    pub recovered: bool,
    /// The stream's current epoch (0 when the stream keeps nothing).
    pub epoch: u64,
    /// With `recovered`: the offset of the last replayed push (the client's position after
    /// the replay). Without: the stream's latest offset when the join was answered.
    pub offset: u64,
}

/// A gateway's lifecycle event for one socket (`ws.evt.<kind>.connect|disconnect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// Socket id.
    pub socket_id: SocketId,
    /// Owner.
    pub user_id: UserId,
    /// Client kind.
    pub kind: ClientKind,
    /// Holding gateway.
    pub gateway: GatewayId,
    /// Unix milliseconds at the gateway.
    pub at_ms: u64,
    /// Connect: rooms the token allows the client to join (empty = decided by rule).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_rooms: Vec<String>,
    /// Disconnect: the close code sent or received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    /// Disconnect: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The relay agent (its node id) whose connection carries this socket; absent for a
    /// socket connected to the gateway directly (`docs/protocol.md` 12.13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<UserId>,
    /// Connect, re-announced: the rooms the socket is in (a first connect is in none), so a
    /// service that rebuilds its record from the announcement keeps the memberships.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<RoomId>,
    /// Connect, re-announced: Unix ms of the original connect; absent on a first connect,
    /// whose `at_ms` is the connect time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at_ms: Option<u64>,
}

/// Last-seen times of a gateway's sockets, sent in batches on a slow period
/// (`ws.evt.<kind>.heartbeat`): the two-level heartbeat of seed 002.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatBatch {
    /// Sending gateway.
    pub gateway: GatewayId,
    /// Unix milliseconds when the batch was cut.
    pub at_ms: u64,
    /// `(socket, last seen Unix ms)` for sockets active since the previous batch.
    pub seen: Vec<(SocketId, u64)>,
}

/// A client's request to join or leave a room, forwarded for a decision
/// (`ws.evt.<kind>.join|leave`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRequest {
    /// Requesting socket.
    pub socket_id: SocketId,
    /// Its owner.
    pub user_id: UserId,
    /// Holding gateway (where the answer goes).
    pub gateway: GatewayId,
    /// Room asked for.
    pub room: RoomId,
    /// The client's frame id, echoed in the answer.
    pub msg_id: u64,
}

/// Instructions a service sends to one gateway (`ws.gw.<gw>.ctl`) or all (`ws.ctl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GatewayControl {
    /// Add a socket to a room (after an authorised join, or server-side membership).
    Join {
        /// Socket.
        socket_id: SocketId,
        /// Room.
        room: RoomId,
        /// Client frame id to ack, or 0 for server-initiated membership.
        #[serde(default)]
        msg_id: u64,
    },
    /// Remove a socket from a room.
    Leave {
        /// Socket.
        socket_id: SocketId,
        /// Room.
        room: RoomId,
        /// Client frame id to ack, or 0.
        #[serde(default)]
        msg_id: u64,
    },
    /// Tell the client its request failed (an error frame with this code).
    Refuse {
        /// Socket.
        socket_id: SocketId,
        /// Client frame id.
        msg_id: u64,
        /// A [`crate::close::ErrorCode`] value.
        code: u16,
        /// Why.
        reason: String,
    },
    /// Close a socket with a close code.
    Close {
        /// Socket.
        socket_id: SocketId,
        /// A [`crate::close::CloseCode`] value.
        code: u16,
        /// Why.
        reason: String,
    },
    /// Ask gateways to re-announce their sessions: all of them when `sockets` is empty (a
    /// service lost its registry), or only those listed that the gateway still holds (a
    /// service found them in a last-seen batch without a record).
    Resync {
        /// The sockets to re-announce; empty: every socket.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sockets: Vec<SocketId>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_welcome() -> Welcome {
        Welcome {
            socket_id: SocketId(123_456_789_012_345),
            user_id: UserId::new("alice").unwrap(),
            gateway: GatewayId::new("gw-1").unwrap(),
            heartbeat: HeartbeatParams {
                base_ms: 10_000,
                step_ms: 5_000,
                max_ms: 60_000,
                grow_after: 3,
                grace_ms: 5_000,
            },
            max_body_bytes: 65_536,
            server_time_ms: 1_800_000_000_000,
            recovery: None,
        }
    }

    #[test]
    fn gateway_stats_round_trip_on_the_bus() {
        let stats = GatewayStats {
            instance: GatewayId::new("gw-1").unwrap(),
            ready: true,
            worker_id: Some(7),
            app_connections: 12,
            agent_connections: 3,
            slow_consumer_closes: 1,
            pushes_delivered: 1_000,
            published: 20,
            interval_ms: 5_000,
            sent_at_ms: 1_800_000_000_000,
        };
        let bytes = to_bus(&stats).unwrap();
        assert_eq!(from_bus::<GatewayStats>(&bytes).unwrap(), stats);
        // An envelope without the optional lease field still parses.
        let v = serde_json::to_value(&stats).unwrap();
        let mut v = v.as_object().unwrap().clone();
        v.remove("worker_id");
        let old: GatewayStats = serde_json::from_value(v.into()).unwrap();
        assert_eq!(old.worker_id, None);
    }

    #[test]
    fn client_bodies_round_trip_in_both_codecs() {
        let welcome = sample_welcome();
        for codec in [BodyCodec::MsgPack, BodyCodec::Json] {
            let bytes = encode_body(codec, &welcome).unwrap();
            assert_eq!(decode_body::<Welcome>(codec, &bytes).unwrap(), welcome);
            let ack = HeartbeatAck {
                next_interval_ms: 15_000,
            };
            let bytes = encode_body(codec, &ack).unwrap();
            assert_eq!(decode_body::<HeartbeatAck>(codec, &bytes).unwrap(), ack);
            let err = ErrorBody {
                code: 413,
                message: "too large".into(),
            };
            assert_eq!(
                decode_body::<ErrorBody>(codec, &encode_body(codec, &err).unwrap()).unwrap(),
                err
            );
            let rc = Reconnect {
                delay_ms: 250,
                reason: "drain".into(),
            };
            assert_eq!(
                decode_body::<Reconnect>(codec, &encode_body(codec, &rc).unwrap()).unwrap(),
                rc
            );
        }
        assert!(matches!(
            decode_body::<Hello>(BodyCodec::Raw, b""),
            Err(PayloadError::RawCodec)
        ));
    }

    #[test]
    fn json_welcome_is_readable_by_a_browser() {
        let json =
            String::from_utf8(encode_body(BodyCodec::Json, &sample_welcome()).unwrap()).unwrap();
        assert!(json.contains("\"socket_id\":\"123456789012345\""), "{json}");
        assert!(json.contains("\"base_ms\":10000"), "{json}");
    }

    #[test]
    fn bus_payloads_round_trip_and_use_named_fields() {
        let event = SessionEvent {
            socket_id: SocketId(9),
            user_id: UserId::new("bob").unwrap(),
            kind: ClientKind::Agent,
            gateway: GatewayId::new("gw-2").unwrap(),
            at_ms: 5,
            allowed_rooms: vec!["lobby".into()],
            close_code: None,
            reason: None,
            via: None,
            rooms: Vec::new(),
            connected_at_ms: None,
        };
        let bytes = to_bus(&event).unwrap();
        assert_eq!(from_bus::<SessionEvent>(&bytes).unwrap(), event);
        // Named fields: a reader in another language finds the keys.
        assert!(bytes.windows(9).any(|w| w == b"socket_id"));
        // A first connect leaves the re-announce fields out.
        assert!(!bytes.windows(6).any(|w| w == b"\xa5rooms"));
        let announced = SessionEvent {
            rooms: vec![RoomId::new("chat.lobby").unwrap()],
            connected_at_ms: Some(3),
            ..event
        };
        assert_eq!(
            from_bus::<SessionEvent>(&to_bus(&announced).unwrap()).unwrap(),
            announced
        );

        let batch = HeartbeatBatch {
            gateway: GatewayId::new("gw-2").unwrap(),
            at_ms: 10,
            seen: vec![(SocketId(1), 7), (SocketId(2), 8)],
        };
        assert_eq!(
            from_bus::<HeartbeatBatch>(&to_bus(&batch).unwrap()).unwrap(),
            batch
        );

        let req = RoomRequest {
            socket_id: SocketId(1),
            user_id: UserId::new("bob").unwrap(),
            gateway: GatewayId::new("gw-2").unwrap(),
            room: RoomId::new("chat.lobby").unwrap(),
            msg_id: 77,
        };
        assert_eq!(
            from_bus::<RoomRequest>(&to_bus(&req).unwrap()).unwrap(),
            req
        );
    }

    #[test]
    fn every_gateway_control_round_trips() {
        let room = RoomId::new("lobby").unwrap();
        let all = [
            GatewayControl::Join {
                socket_id: SocketId(1),
                room: room.clone(),
                msg_id: 3,
            },
            GatewayControl::Leave {
                socket_id: SocketId(1),
                room,
                msg_id: 0,
            },
            GatewayControl::Refuse {
                socket_id: SocketId(1),
                msg_id: 3,
                code: 403,
                reason: "not allowed".into(),
            },
            GatewayControl::Close {
                socket_id: SocketId(1),
                code: 4503,
                reason: "bye".into(),
            },
            GatewayControl::Resync { sockets: vec![] },
            GatewayControl::Resync {
                sockets: vec![SocketId(1), SocketId(137_465_797_017_604_096)],
            },
        ];
        for ctl in all {
            assert_eq!(
                from_bus::<GatewayControl>(&to_bus(&ctl).unwrap()).unwrap(),
                ctl
            );
            let json = serde_json::to_string(&ctl).unwrap();
            assert_eq!(serde_json::from_str::<GatewayControl>(&json).unwrap(), ctl);
        }
    }

    #[test]
    fn a_resync_for_every_socket_keeps_its_documented_bytes() {
        // docs/protocol.md 12.7: `{"op": "resync"}`; gateways and services in other
        // languages send exactly these bytes.
        let bytes = [
            0x81, 0xa2, b'o', b'p', 0xa6, b'r', b'e', b's', b'y', b'n', b'c',
        ];
        let all = GatewayControl::Resync { sockets: vec![] };
        assert_eq!(to_bus(&all).unwrap(), bytes);
        assert_eq!(from_bus::<GatewayControl>(&bytes).unwrap(), all);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(from_bus::<GatewayControl>(b"\xc1\xff\x00").is_err());
        assert!(decode_body::<Welcome>(BodyCodec::Json, b"{").is_err());
    }
}
