//! NATS header names and the per-hop timestamp convention.
//!
//! Headers carry everything routing and tracing need so that no hop between a client and
//! a service ever decodes a body. Names are lowercase (NATS header names are case
//! sensitive, and W3C's `traceparent` is lowercase by convention).
//!
//! Per-hop timestamps: every hop appends one `ws-hop` value `"<hop>=<unix micros>"`. NATS
//! headers may repeat, so the list grows as the message travels and the receiver can
//! compute each hop's latency without any clock other than the senders'.

/// W3C trace context (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// W3C vendor trace state, passed through untouched.
pub const TRACESTATE: &str = "tracestate";
/// One value per hop: `<hop>=<unix micros>`.
pub const HOP: &str = "ws-hop";
/// Socket id (decimal). On `ws.gw.<gw>.push` it may hold several, comma-separated.
pub const SOCKET_ID: &str = "ws-socket";
/// User id of the socket's owner.
pub const USER_ID: &str = "ws-user";
/// Instance name of the gateway that holds the socket.
pub const GATEWAY_ID: &str = "ws-gateway";
/// Client kind (`app` or `agent`).
pub const CLIENT_KIND: &str = "ws-kind";
/// Operation: the frame kind name for upstream frames (`publish`, `join`, `ack`, ...).
pub const OPERATION: &str = "ws-op";
/// Message id (decimal u64): the client's frame id upstream, the push id downstream.
pub const MSG_ID: &str = "ws-msg-id";
/// Route of a publish frame or push.
pub const ROUTE: &str = "ws-route";
/// Body codec name (`raw`, `msgpack`, `json`) as the sender declared it.
pub const CODEC: &str = "ws-codec";
/// `1` when the body is compressed end to end.
pub const COMPRESSED: &str = "ws-compressed";
/// `1` when the sender wants a delivery receipt for a push.
pub const RECEIPT: &str = "ws-receipt";
/// Unix milliseconds after which a push must not be delivered.
pub const EXPIRES: &str = "ws-expires";
/// Room id for join/leave requests and room pushes.
pub const ROOM: &str = "ws-room";
/// Socket ids to exclude from a room or broadcast push (for example the sender).
pub const EXCLUDE: &str = "ws-exclude";
/// A count (sockets a push was delivered to, in a `delivered` event).
pub const COUNT: &str = "ws-count";
/// On `ws.agent.<node>`: close the node's agent sockets with this close code instead of
/// delivering a push (the scheduler revoking a node).
pub const CLOSE: &str = "ws-close";
/// On a push kept in history: its stream's epoch (decimal u64, never 0).
pub const EPOCH: &str = "ws-epoch";
/// On a push kept in history: its offset in the stream (decimal u64, from 1, no gaps).
pub const OFFSET: &str = "ws-offset";
/// JetStream's optimistic-concurrency header: the publish is refused unless the stream's
/// last message on this subject has this sequence (0: no message on the subject). ws-api
/// uses it so two replicas can never give two pushes the same offset.
pub const JS_EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";

/// Every header name, for tests and documentation.
pub const ALL: [&str; 20] = [
    TRACEPARENT,
    TRACESTATE,
    HOP,
    SOCKET_ID,
    USER_ID,
    GATEWAY_ID,
    CLIENT_KIND,
    OPERATION,
    MSG_ID,
    ROUTE,
    CODEC,
    COMPRESSED,
    RECEIPT,
    EXPIRES,
    ROOM,
    EXCLUDE,
    COUNT,
    CLOSE,
    EPOCH,
    OFFSET,
];

/// Names of the hops that stamp `ws-hop`, in the order a push or publish meets them.
pub mod hop {
    /// Gateway received the client's frame.
    pub const GATEWAY_IN: &str = "gw-in";
    /// Gateway published it to the bus.
    pub const GATEWAY_PUB: &str = "gw-pub";
    /// A service received it from the bus.
    pub const SERVICE_IN: &str = "svc-in";
    /// A service published a push.
    pub const SERVICE_PUB: &str = "svc-pub";
    /// Gateway received the push from the bus.
    pub const GATEWAY_RECV: &str = "gw-recv";
    /// Gateway wrote the push to the client's queue.
    pub const GATEWAY_OUT: &str = "gw-out";
}

/// Formats one `ws-hop` value.
pub fn format_hop(hop: &str, unix_micros: u64) -> String {
    format!("{hop}={unix_micros}")
}

/// Parses one `ws-hop` value.
pub fn parse_hop(value: &str) -> Option<(&str, u64)> {
    let (hop, micros) = value.split_once('=')?;
    if hop.is_empty() {
        return None;
    }
    Some((hop, micros.parse().ok()?))
}

/// Microseconds since the Unix epoch, the unit of hop stamps.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(feature = "nats")]
mod nats {
    use std::str::FromStr;

    use async_nats::header::{HeaderMap, HeaderName, HeaderValue};

    /// Why a value could not be put in a header.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("value not allowed in NATS header {name}")]
    pub struct HeaderError {
        /// Header the value was meant for.
        pub name: &'static str,
    }

    /// Inserts `value` under `name`, replacing any previous value; refuses values a NATS
    /// header cannot carry (newlines) instead of panicking as `HeaderMap::insert` would.
    pub fn set(map: &mut HeaderMap, name: &'static str, value: &str) -> Result<(), HeaderError> {
        let value = HeaderValue::from_str(value).map_err(|_| HeaderError { name })?;
        let header = HeaderName::from_str(name).map_err(|_| HeaderError { name })?;
        map.insert(header, value);
        Ok(())
    }

    /// Appends a `ws-hop` stamp.
    pub fn stamp_hop(map: &mut HeaderMap, hop: &str, unix_micros: u64) {
        if let Ok(value) = HeaderValue::from_str(&super::format_hop(hop, unix_micros)) {
            map.append(super::HOP, value);
        }
    }

    /// All `ws-hop` stamps in order; malformed values are skipped.
    pub fn hops(map: &HeaderMap) -> Vec<(String, u64)> {
        map.get_all(super::HOP)
            .filter_map(|v| super::parse_hop(v.as_str()).map(|(h, t)| (h.to_owned(), t)))
            .collect()
    }

    /// The value of `name` as a string, if present.
    pub fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
        map.get(name).map(HeaderValue::as_str)
    }
}

#[cfg(feature = "nats")]
pub use nats::{HeaderError, get, hops, set, stamp_hop};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_lowercase_and_valid() {
        let mut seen = std::collections::HashSet::new();
        for name in ALL {
            assert!(seen.insert(name), "duplicate {name}");
            assert_eq!(name, name.to_ascii_lowercase());
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{name}"
            );
        }
    }

    #[test]
    fn hop_values_round_trip() {
        let v = format_hop(hop::GATEWAY_IN, 1_700_000_000_123_456);
        assert_eq!(v, "gw-in=1700000000123456");
        assert_eq!(parse_hop(&v), Some(("gw-in", 1_700_000_000_123_456)));
        assert_eq!(parse_hop("gw-in"), None);
        assert_eq!(parse_hop("=5"), None);
        assert_eq!(parse_hop("gw-in=x"), None);
        assert!(now_micros() > 1_700_000_000_000_000);
    }

    #[cfg(feature = "nats")]
    #[test]
    fn hop_stamps_accumulate_in_a_header_map() {
        let mut map = async_nats::HeaderMap::new();
        stamp_hop(&mut map, hop::GATEWAY_IN, 1);
        stamp_hop(&mut map, hop::GATEWAY_PUB, 2);
        map.append(HOP, "garbage");
        stamp_hop(&mut map, hop::SERVICE_IN, 3);
        let got = hops(&map);
        assert_eq!(
            got,
            vec![
                ("gw-in".to_owned(), 1),
                ("gw-pub".to_owned(), 2),
                ("svc-in".to_owned(), 3)
            ]
        );
    }

    #[cfg(feature = "nats")]
    #[test]
    fn set_refuses_values_that_would_break_the_protocol() {
        let mut map = async_nats::HeaderMap::new();
        assert!(set(&mut map, USER_ID, "alice").is_ok());
        assert_eq!(get(&map, USER_ID), Some("alice"));
        assert_eq!(
            set(&mut map, ROUTE, "a\r\nb"),
            Err(HeaderError { name: ROUTE })
        );
    }
}
