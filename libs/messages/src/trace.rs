//! W3C trace context in the two shapes the system carries it: 25 binary bytes in a client
//! frame header and a `traceparent` text header on the bus. Conversions between them live
//! here so every hop formats and parses it the same way; with the `nats` feature it also
//! injects into and extracts from async-nats header maps.
//!
//! Only the context travels; spans are made by the services' tracing layers.

use std::fmt::Write as _;

/// A W3C trace context (version 00): trace id, parent span id and trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// 16-byte trace id; never all zero.
    pub trace_id: [u8; 16],
    /// 8-byte id of the span that is the parent of the next hop; never all zero.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceContext {
    /// The "sampled" bit of the trace flags.
    pub const SAMPLED: u8 = 0x01;

    /// Whether the head sampling decision was to record this trace.
    pub fn is_sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// Parses the 25-byte binary block of a frame header. `None` when the block is short or
    /// an id is all zero (which W3C defines as invalid).
    pub fn from_binary(block: &[u8]) -> Option<Self> {
        let trace_id: [u8; 16] = block.get(0..16)?.try_into().ok()?;
        let span_id: [u8; 8] = block.get(16..24)?.try_into().ok()?;
        let flags = *block.get(24)?;
        Self::checked(trace_id, span_id, flags)
    }

    fn checked(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<Self> {
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The 25-byte binary block.
    pub fn to_binary(&self) -> [u8; 25] {
        let mut out = [0u8; 25];
        out[..16].copy_from_slice(&self.trace_id);
        out[16..24].copy_from_slice(&self.span_id);
        out[24] = self.flags;
        out
    }

    /// Formats as a `traceparent` header value: `00-<32 hex>-<16 hex>-<2 hex>`.
    pub fn to_traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        let _ = write!(out, "-{:02x}", self.flags);
        out
    }

    /// Parses a `traceparent` value. Accepts version 00 and, per W3C, higher versions whose
    /// first four fields have the version-00 shape. Rejects version ff and zero ids.
    pub fn parse_traceparent(value: &str) -> Option<Self> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parse_hex::<1>(parts.next()?)?;
        if version[0] == 0xff {
            return None;
        }
        let trace_id = parse_hex::<16>(parts.next()?)?;
        let span_id = parse_hex::<8>(parts.next()?)?;
        let flags = parse_hex::<1>(parts.next()?)?[0];
        if version[0] == 0 && parts.next().is_some() {
            return None;
        }
        Self::checked(trace_id, span_id, flags)
    }

    /// The trace id as 32 lowercase hex characters, for log fields.
    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0])?;
        let lo = hex_val(pair[1])?;
        out[i] = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_val(b: u8) -> Option<u8> {
    // W3C requires lowercase hex.
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

#[cfg(feature = "nats")]
mod nats {
    use std::str::FromStr;

    use async_nats::header::{HeaderMap, HeaderValue};

    use super::TraceContext;
    use crate::headers;

    impl TraceContext {
        /// Writes `traceparent` into `headers`, replacing any previous value.
        pub fn inject(&self, map: &mut HeaderMap) {
            // The value is built from hex digits and dashes, always a valid header value.
            if let Ok(value) = HeaderValue::from_str(&self.to_traceparent()) {
                map.insert(headers::TRACEPARENT, value);
            }
        }

        /// Reads `traceparent` from `headers`; `None` when absent or malformed.
        pub fn extract(map: &HeaderMap) -> Option<Self> {
            let value = map.get(headers::TRACEPARENT)?;
            Self::parse_traceparent(value.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_the_w3c_example() {
        let ctx = TraceContext::parse_traceparent(EXAMPLE).unwrap();
        assert!(ctx.is_sampled());
        assert_eq!(ctx.to_traceparent(), EXAMPLE);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(TraceContext::from_binary(&ctx.to_binary()), Some(ctx));
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse_traceparent(bad), None, "{bad}");
        }
        // A future version may append fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later";
        assert!(TraceContext::parse_traceparent(future).is_some());
    }

    #[cfg(feature = "nats")]
    #[test]
    fn inject_and_extract_through_a_nats_header_map() {
        let ctx = TraceContext::parse_traceparent(EXAMPLE).unwrap();
        let mut map = async_nats::HeaderMap::new();
        assert_eq!(TraceContext::extract(&map), None);
        ctx.inject(&mut map);
        assert_eq!(TraceContext::extract(&map), Some(ctx));
        map.insert(crate::headers::TRACEPARENT, "garbage");
        assert_eq!(TraceContext::extract(&map), None);
    }
}
