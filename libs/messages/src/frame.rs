//! The client frame codec: the binary layout of every WebSocket message exchanged between
//! a client (browser, app, edge agent) and a gateway.
//!
//! A frame is a 12-byte fixed header, an optional 25-byte binary trace context, a short
//! route string and an opaque body that runs to the end of the WebSocket message (the
//! WebSocket layer already delimits messages, so the frame carries no length of its own).
//! Decoding reads the header only: the body comes back as a `Bytes` slice of the input,
//! never copied and never parsed. Encoding produces one `Bytes` that a gateway can hand to
//! any number of sockets. `docs/protocol.md` is the normative description; this module
//! and its tests must agree with it.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::ids::RoomId;
use crate::trace::TraceContext;

/// The only protocol version this codec speaks.
pub const VERSION: u8 = 1;
/// Bytes before the optional trace context: version, kind, flags, route length, message id.
pub const FIXED_HEADER_LEN: usize = 12;
/// Length of the binary trace context block present when [`Flags::TRACE`] is set.
pub const TRACE_CONTEXT_LEN: usize = 25;
/// The route length travels in one byte.
pub const MAX_ROUTE_LEN: usize = u8::MAX as usize;

/// What a frame is for. The numeric values are the wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Client -> gateway, optional first frame: client name and version.
    Hello = 1,
    /// Gateway -> client, first frame: socket id and heartbeat parameters.
    Welcome = 2,
    /// Client -> gateway liveness beat.
    Heartbeat = 3,
    /// Gateway -> client answer to a heartbeat, carrying the next expected interval.
    HeartbeatAck = 4,
    /// Client -> services message on a route.
    Publish = 5,
    /// Services -> client message.
    Push = 6,
    /// Receipt, either way: the message with this frame's message id was received or accepted.
    Ack = 7,
    /// Client asks to join the room named by the route.
    Join = 8,
    /// Client asks to leave the room named by the route.
    Leave = 9,
    /// Gateway -> client: the message with this frame's message id (or 0) failed.
    Error = 10,
    /// Gateway -> client: reconnect after the delay in the body (drain, rebalancing).
    Reconnect = 11,
    /// Client -> gateway: a new token (raw body) for the same identity; the session then
    /// lasts until it expires. Answered with an ack or an error with the same message id.
    Refresh = 12,
}

impl FrameKind {
    /// Every kind, in wire order; tests and tools iterate over it.
    pub const ALL: [FrameKind; 12] = [
        FrameKind::Hello,
        FrameKind::Welcome,
        FrameKind::Heartbeat,
        FrameKind::HeartbeatAck,
        FrameKind::Publish,
        FrameKind::Push,
        FrameKind::Ack,
        FrameKind::Join,
        FrameKind::Leave,
        FrameKind::Error,
        FrameKind::Reconnect,
        FrameKind::Refresh,
    ];

    /// The kind for a wire value, if there is one.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value).wrapping_sub(1)).copied()
    }

    /// Lowercase name used in logs, metrics labels and the `ws-op` header.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameKind::Hello => "hello",
            FrameKind::Welcome => "welcome",
            FrameKind::Heartbeat => "heartbeat",
            FrameKind::HeartbeatAck => "heartbeat_ack",
            FrameKind::Publish => "publish",
            FrameKind::Push => "push",
            FrameKind::Ack => "ack",
            FrameKind::Join => "join",
            FrameKind::Leave => "leave",
            FrameKind::Error => "error",
            FrameKind::Reconnect => "reconnect",
            FrameKind::Refresh => "refresh",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the body is encoded. Only the endpoints care; hops in between pass it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum BodyCodec {
    /// Opaque bytes with no declared structure.
    #[default]
    Raw = 0,
    /// MessagePack (maps with string keys for the typed bodies this crate defines).
    MsgPack = 1,
    /// UTF-8 JSON.
    Json = 2,
}

impl BodyCodec {
    /// Lowercase name used in headers and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyCodec::Raw => "raw",
            BodyCodec::MsgPack => "msgpack",
            BodyCodec::Json => "json",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(BodyCodec::Raw),
            "msgpack" => Some(BodyCodec::MsgPack),
            "json" => Some(BodyCodec::Json),
            _ => None,
        }
    }
}

/// The flags byte: body codec (bits 0-1), compressed (bit 2), trace context present (bit 3),
/// receipt requested (bit 4), position block present (bit 5). Bits 6-7 are reserved and
/// must be zero in version 1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    const CODEC_MASK: u8 = 0b0000_0011;
    /// The body is compressed end to end (DEFLATE, RFC 1951, raw); hops never touch it.
    pub const COMPRESSED: u8 = 0b0000_0100;
    /// A 25-byte binary trace context follows the fixed header.
    pub const TRACE: u8 = 0b0000_1000;
    /// On a push: the sender wants a delivery receipt, so the client should answer with an
    /// ack frame carrying the push's message id.
    pub const RECEIPT: u8 = 0b0001_0000;
    /// On a push: a position block (history stream, epoch, offset) follows the trace
    /// context. Set only on connections that asked for positions (`positions=1`).
    pub const POSITION: u8 = 0b0010_0000;
    const RESERVED: u8 = 0b1100_0000;

    /// Flags for a body in `codec`, uncompressed, without trace context.
    pub fn new(codec: BodyCodec) -> Self {
        Flags(codec as u8)
    }

    /// Validates a wire byte.
    pub fn from_bits(bits: u8) -> Result<Self, FrameError> {
        if bits & Self::RESERVED != 0 {
            return Err(FrameError::ReservedFlags(bits));
        }
        if bits & Self::CODEC_MASK == 3 {
            return Err(FrameError::UnknownCodec(3));
        }
        Ok(Flags(bits))
    }

    /// The wire byte.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// The body codec.
    pub fn codec(self) -> BodyCodec {
        match self.0 & Self::CODEC_MASK {
            1 => BodyCodec::MsgPack,
            2 => BodyCodec::Json,
            _ => BodyCodec::Raw,
        }
    }

    /// Whether the body is compressed.
    pub fn compressed(self) -> bool {
        self.0 & Self::COMPRESSED != 0
    }

    /// Returns these flags with the compressed bit set or cleared.
    pub fn with_compressed(self, on: bool) -> Self {
        if on {
            Flags(self.0 | Self::COMPRESSED)
        } else {
            Flags(self.0 & !Self::COMPRESSED)
        }
    }

    /// Whether a delivery receipt is requested.
    pub fn receipt(self) -> bool {
        self.0 & Self::RECEIPT != 0
    }

    /// Returns these flags with the receipt bit set or cleared.
    pub fn with_receipt(self, on: bool) -> Self {
        if on {
            Flags(self.0 | Self::RECEIPT)
        } else {
            Flags(self.0 & !Self::RECEIPT)
        }
    }

    fn with_trace(self, on: bool) -> Self {
        if on {
            Flags(self.0 | Self::TRACE)
        } else {
            Flags(self.0 & !Self::TRACE)
        }
    }

    fn has_trace(self) -> bool {
        self.0 & Self::TRACE != 0
    }

    fn with_position(self, on: bool) -> Self {
        if on {
            Flags(self.0 | Self::POSITION)
        } else {
            Flags(self.0 & !Self::POSITION)
        }
    }

    fn has_position(self) -> bool {
        self.0 & Self::POSITION != 0
    }
}

/// Which history stream a positioned push belongs to (docs/protocol.md, section 2.4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamRef {
    /// The connection's own user stream (pushes to its user id).
    User,
    /// A room's stream.
    Room(RoomId),
}

impl StreamRef {
    const USER: u8 = 1;
    const ROOM: u8 = 2;
}

/// Where a push sits in its history stream: the stream, its epoch (changes when the
/// stream's history is lost or restarted, so offsets of another epoch mean nothing) and the
/// push's offset (1, 2, 3, ... without gaps within an epoch).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// The stream.
    pub stream: StreamRef,
    /// The stream's epoch; never 0.
    pub epoch: u64,
    /// The push's offset in the stream; the first push of an epoch is 1.
    pub offset: u64,
}

impl Position {
    /// Bytes of the position block on the wire.
    pub fn wire_len(&self) -> usize {
        POSITION_FIXED_LEN
            + match &self.stream {
                StreamRef::User => 0,
                StreamRef::Room(room) => room.as_str().len(),
            }
    }

    fn encode_into(&self, out: &mut BytesMut) {
        out.put_u64(self.epoch);
        out.put_u64(self.offset);
        match &self.stream {
            StreamRef::User => {
                out.put_u8(StreamRef::USER);
                out.put_u8(0);
            }
            StreamRef::Room(room) => {
                out.put_u8(StreamRef::ROOM);
                // Room ids are at most MAX_ID_LEN (128) bytes.
                out.put_u8(u8::try_from(room.as_str().len()).unwrap_or(u8::MAX));
                out.put_slice(room.as_str().as_bytes());
            }
        }
    }

    /// Parses a position block at the start of `buf`; returns it and its length.
    fn parse(buf: &[u8], at: usize) -> Result<(Position, usize), FrameError> {
        let truncated = |needed| FrameError::Truncated {
            needed,
            got: buf.len() + at,
        };
        let fixed: &[u8; POSITION_FIXED_LEN] = buf
            .get(..POSITION_FIXED_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(truncated(at + POSITION_FIXED_LEN))?;
        let (epoch, rest) = fixed.split_at(8);
        let (offset, rest) = rest.split_at(8);
        let epoch = u64::from_be_bytes(epoch.try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(offset.try_into().unwrap_or_default());
        let (kind, len) = (rest[0], usize::from(rest[1]));
        let end = POSITION_FIXED_LEN + len;
        let id = buf
            .get(POSITION_FIXED_LEN..end)
            .ok_or(truncated(at + end))?;
        let stream = match kind {
            StreamRef::USER if len == 0 => StreamRef::User,
            StreamRef::ROOM => {
                let id = std::str::from_utf8(id).map_err(|_| FrameError::InvalidPosition)?;
                StreamRef::Room(RoomId::new(id).map_err(|_| FrameError::InvalidPosition)?)
            }
            _ => return Err(FrameError::InvalidPosition),
        };
        if epoch == 0 || offset == 0 {
            return Err(FrameError::InvalidPosition);
        }
        Ok((
            Position {
                stream,
                epoch,
                offset,
            },
            end,
        ))
    }
}

/// Bytes of a position block without its room id: epoch, offset, stream kind, id length.
pub const POSITION_FIXED_LEN: usize = 18;

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flags")
            .field("codec", &self.codec())
            .field("compressed", &self.compressed())
            .field("trace", &self.has_trace())
            .field("receipt", &self.receipt())
            .finish()
    }
}

/// Limits a decoder enforces. The gateway takes them from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest route accepted, at most [`MAX_ROUTE_LEN`].
    pub max_route_len: usize,
    /// Largest body accepted, in bytes.
    pub max_body_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_route_len: 128,
            max_body_len: 64 * 1024,
        }
    }
}

impl Limits {
    /// The largest whole frame these limits admit; a WebSocket layer can reject anything
    /// larger before buffering it.
    pub fn max_frame_len(&self) -> usize {
        FIXED_HEADER_LEN
            + TRACE_CONTEXT_LEN
            + self.max_route_len.min(MAX_ROUTE_LEN)
            + self.max_body_len
    }
}

/// Why bytes are not a frame. Each variant is a distinct, stable condition; none of them
/// is ever a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header needs.
    #[error("frame truncated: header needs {needed} bytes, got {got}")]
    Truncated {
        /// Bytes the header needs given what was read so far.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A version this codec does not speak.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// A kind byte with no meaning.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A reserved flag bit is set.
    #[error("reserved flag bits set in {0:#010b}")]
    ReservedFlags(u8),
    /// The codec bits name no codec.
    #[error("unknown body codec {0}")]
    UnknownCodec(u8),
    /// The route is longer than the configured maximum.
    #[error("route is {len} bytes, the maximum is {max}")]
    RouteTooLong {
        /// Route length on the wire.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The route has characters or a shape a NATS subject cannot carry.
    #[error("route is not valid: {0}")]
    InvalidRoute(#[from] RouteError),
    /// The trace context block is not a valid W3C trace context.
    #[error("trace context is not valid (all-zero trace or span id)")]
    InvalidTraceContext,
    /// The position block names no stream, a malformed room, or a zero epoch or offset.
    #[error("position block is not valid")]
    InvalidPosition,
    /// The body is larger than the configured maximum.
    #[error("body is {len} bytes, the maximum is {max}")]
    BodyTooLarge {
        /// Body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
}

impl FrameError {
    /// The error code reported to the client in an error frame.
    pub fn error_code(&self) -> crate::close::ErrorCode {
        use crate::close::ErrorCode;
        match self {
            FrameError::BodyTooLarge { .. } => ErrorCode::TooLarge,
            FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            FrameError::RouteTooLong { .. } | FrameError::InvalidRoute(_) => ErrorCode::BadRoute,
            _ => ErrorCode::BadFrame,
        }
    }

    /// The close code a gateway closes the connection with after this error: every decoder
    /// error ends the session (docs/protocol.md, section 8).
    pub fn close_code(&self) -> crate::close::CloseCode {
        use crate::close::CloseCode;
        match self {
            FrameError::BodyTooLarge { .. } => CloseCode::FrameTooLarge,
            FrameError::UnsupportedVersion(_) => CloseCode::UnsupportedVersion,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// Why a route is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Routes are dot-separated tokens of `[A-Za-z0-9_-:@=+]`.
    #[error("byte {byte:#04x} at offset {at} is not allowed in a route")]
    BadByte {
        /// The offending byte.
        byte: u8,
        /// Its offset in the route.
        at: usize,
    },
    /// Leading, trailing or doubled dot.
    #[error("route has an empty token")]
    EmptyToken,
    /// Longer than [`MAX_ROUTE_LEN`].
    #[error("route is longer than {MAX_ROUTE_LEN} bytes")]
    TooLong,
}

/// Whether `b` may appear inside a route or id token. The set is what a NATS subject token
/// carries safely and what survives URLs and logs unescaped.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'=' | b'+')
}

/// Checks that `bytes` is empty or dot-separated non-empty tokens of allowed bytes.
pub(crate) fn validate_dotted(bytes: &[u8]) -> Result<(), RouteError> {
    if bytes.len() > MAX_ROUTE_LEN {
        return Err(RouteError::TooLong);
    }
    if bytes.is_empty() {
        return Ok(());
    }
    let mut token_len = 0usize;
    for (at, &byte) in bytes.iter().enumerate() {
        if byte == b'.' {
            if token_len == 0 {
                return Err(RouteError::EmptyToken);
            }
            token_len = 0;
        } else if is_token_byte(byte) {
            token_len += 1;
        } else {
            return Err(RouteError::BadByte { byte, at });
        }
    }
    if token_len == 0 {
        return Err(RouteError::EmptyToken);
    }
    Ok(())
}

/// A validated route: empty, or dot-separated tokens that map one-to-one onto NATS subject
/// tokens. Cheap to clone (shares the frame's buffer).
#[derive(Clone, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Route(ByteString);

impl Route {
    /// Validates a route from a string.
    pub fn new(route: &str) -> Result<Self, RouteError> {
        validate_dotted(route.as_bytes())?;
        Ok(Route(ByteString::from(route)))
    }

    /// The empty route.
    pub fn empty() -> Self {
        Route::default()
    }

    fn from_validated_bytes(bytes: Bytes) -> Result<Self, RouteError> {
        validate_dotted(&bytes)?;
        // Validation admits ASCII only, so this cannot fail; map it anyway rather than panic.
        ByteString::try_from(bytes)
            .map(Route)
            .map_err(|_| RouteError::BadByte { byte: 0, at: 0 })
    }

    /// The route text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the route is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Route {
    type Err = RouteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Route::new(s)
    }
}

/// One decoded (or to-be-encoded) frame. The body is opaque.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is for.
    pub kind: FrameKind,
    /// Body codec and compression; the trace bit is derived from `trace`.
    pub flags: Flags,
    /// Correlates acks, errors and receipts with the message they answer; 0 when unused.
    pub msg_id: u64,
    /// W3C trace context the sender wants continued, if any.
    pub trace: Option<TraceContext>,
    /// On a push to a connection that asked for positions: the push's place in its history
    /// stream.
    pub position: Option<Position>,
    /// Where a publish goes, which room a join/leave names, or the route a service gave a
    /// push; empty otherwise.
    pub route: Route,
    /// The body, never interpreted by the codec.
    pub body: Bytes,
}

impl Frame {
    /// A frame of `kind` with no route, no id and an empty raw body.
    pub fn new(kind: FrameKind) -> Self {
        Frame {
            kind,
            flags: Flags::default(),
            msg_id: 0,
            trace: None,
            position: None,
            route: Route::empty(),
            body: Bytes::new(),
        }
    }

    /// Sets the message id.
    #[must_use]
    pub fn with_msg_id(mut self, msg_id: u64) -> Self {
        self.msg_id = msg_id;
        self
    }

    /// Sets the route.
    #[must_use]
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Sets the body and its codec.
    #[must_use]
    pub fn with_body(mut self, codec: BodyCodec, body: impl Into<Bytes>) -> Self {
        self.flags = Flags::new(codec)
            .with_compressed(self.flags.compressed())
            .with_receipt(self.flags.receipt());
        self.body = body.into();
        self
    }

    /// Sets the trace context.
    #[must_use]
    pub fn with_trace(mut self, trace: Option<TraceContext>) -> Self {
        self.trace = trace;
        self
    }

    /// Sets the position block.
    #[must_use]
    pub fn with_position(mut self, position: Option<Position>) -> Self {
        self.position = position;
        self
    }

    /// Decodes one WebSocket message. The returned body and route share `buf`'s memory
    /// (a reference-count increment, no copy).
    pub fn decode(buf: &Bytes, limits: &Limits) -> Result<Frame, FrameError> {
        let header = FrameHeader::parse(buf, limits)?;
        let route = Route::from_validated_bytes(buf.slice(header.route_start..header.body_start))?;
        Ok(Frame {
            kind: header.kind,
            flags: header.flags.with_trace(false).with_position(false),
            msg_id: header.msg_id,
            trace: header.trace,
            position: header.position,
            route,
            body: buf.slice(header.body_start..),
        })
    }

    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.trace.is_some(), self.route.len(), self.body.len())
            + self.position.as_ref().map_or(0, Position::wire_len)
    }

    /// Encodes into one contiguous buffer (one allocation).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        encode_positioned(
            out,
            self.kind,
            self.flags,
            self.msg_id,
            self.trace.as_ref(),
            self.position.as_ref(),
            &self.route,
            &self.body,
        );
    }
}

/// Size of a frame with these parts.
pub fn encoded_len(trace: bool, route_len: usize, body_len: usize) -> usize {
    FIXED_HEADER_LEN + if trace { TRACE_CONTEXT_LEN } else { 0 } + route_len + body_len
}

/// Encodes a frame from parts without building a [`Frame`]; a gateway uses it to turn a
/// bus message into a push frame with exactly one copy of the body.
pub fn encode_parts(
    out: &mut BytesMut,
    kind: FrameKind,
    flags: Flags,
    msg_id: u64,
    trace: Option<&TraceContext>,
    route: &Route,
    body: &[u8],
) {
    encode_positioned(out, kind, flags, msg_id, trace, None, route, body);
}

/// [`encode_parts`] with a position block (a push from a history stream, for a connection
/// that asked for positions).
#[allow(clippy::too_many_arguments)]
pub fn encode_positioned(
    out: &mut BytesMut,
    kind: FrameKind,
    flags: Flags,
    msg_id: u64,
    trace: Option<&TraceContext>,
    position: Option<&Position>,
    route: &Route,
    body: &[u8],
) {
    out.reserve(
        encoded_len(trace.is_some(), route.len(), body.len())
            + position.map_or(0, Position::wire_len),
    );
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u8(
        flags
            .with_trace(trace.is_some())
            .with_position(position.is_some())
            .bits(),
    );
    // Route::new caps routes at MAX_ROUTE_LEN, so the length fits in the byte.
    out.put_u8(u8::try_from(route.len()).unwrap_or(u8::MAX));
    out.put_u64(msg_id);
    if let Some(trace) = trace {
        out.put_slice(&trace.trace_id);
        out.put_slice(&trace.span_id);
        out.put_u8(trace.flags);
    }
    if let Some(position) = position {
        position.encode_into(out);
    }
    out.put_slice(route.as_str().as_bytes());
    out.put_slice(body);
}

/// The parsed header of a frame, with offsets into the buffer it came from. Reading it
/// costs a few comparisons and touches no body byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub kind: FrameKind,
    /// Flags as on the wire (including the trace bit).
    pub flags: Flags,
    /// Message id.
    pub msg_id: u64,
    /// Trace context, if present.
    pub trace: Option<TraceContext>,
    /// Position block, if present.
    pub position: Option<Position>,
    /// Offset of the first route byte.
    pub route_start: usize,
    /// Offset of the first body byte (one past the route).
    pub body_start: usize,
}

impl FrameHeader {
    /// Parses and validates the header of `buf` against `limits`.
    pub fn parse(buf: &[u8], limits: &Limits) -> Result<FrameHeader, FrameError> {
        let fixed: &[u8; FIXED_HEADER_LEN] = buf
            .get(..FIXED_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(FrameError::Truncated {
                needed: FIXED_HEADER_LEN,
                got: buf.len(),
            })?;
        let [version, kind, flags, route_len, id @ ..] = *fixed;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
        let flags = Flags::from_bits(flags)?;
        let msg_id = u64::from_be_bytes(id);
        let route_len = usize::from(route_len);
        let max_route = limits.max_route_len.min(MAX_ROUTE_LEN);
        if route_len > max_route {
            return Err(FrameError::RouteTooLong {
                len: route_len,
                max: max_route,
            });
        }
        let mut at = FIXED_HEADER_LEN;
        let trace = if flags.has_trace() {
            let block = buf
                .get(at..at + TRACE_CONTEXT_LEN)
                .ok_or(FrameError::Truncated {
                    needed: at + TRACE_CONTEXT_LEN,
                    got: buf.len(),
                })?;
            at += TRACE_CONTEXT_LEN;
            Some(TraceContext::from_binary(block).ok_or(FrameError::InvalidTraceContext)?)
        } else {
            None
        };
        let position = if flags.has_position() {
            let (position, len) = Position::parse(buf.get(at..).unwrap_or_default(), at)?;
            at += len;
            Some(position)
        } else {
            None
        };
        let route_start = at;
        let body_start = route_start + route_len;
        if buf.len() < body_start {
            return Err(FrameError::Truncated {
                needed: body_start,
                got: buf.len(),
            });
        }
        let body_len = buf.len() - body_start;
        if body_len > limits.max_body_len {
            return Err(FrameError::BodyTooLarge {
                len: body_len,
                max: limits.max_body_len,
            });
        }
        Ok(FrameHeader {
            kind,
            flags,
            msg_id,
            trace,
            position,
            route_start,
            body_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn every_kind_round_trips_through_its_wire_value() {
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
            let frame = Frame::new(kind)
                .with_msg_id(42)
                .with_route(Route::new("chat.send").unwrap())
                .with_body(BodyCodec::MsgPack, &b"\x81\xa1a\x01"[..]);
            let decoded = Frame::decode(&frame.encode(), &limits()).unwrap();
            assert_eq!(decoded, frame, "{kind}");
        }
        assert_eq!(FrameKind::from_u8(0), None);
        assert_eq!(FrameKind::from_u8(13), None);
    }

    #[test]
    fn a_position_block_round_trips_and_sits_between_trace_and_route() {
        let room = Position {
            stream: StreamRef::Room(RoomId::new("chat.lobby").unwrap()),
            epoch: 7,
            offset: 42,
        };
        let frame = Frame::new(FrameKind::Push)
            .with_msg_id(9)
            .with_position(Some(room.clone()))
            .with_route(Route::new("msg").unwrap())
            .with_body(BodyCodec::Json, &b"{}"[..]);
        let bytes = frame.encode();
        assert_eq!(bytes[2], 0x22, "json codec | position bit");
        assert_eq!(&bytes[12..20], &7u64.to_be_bytes());
        assert_eq!(&bytes[20..28], &42u64.to_be_bytes());
        assert_eq!(&bytes[28..30], &[2, 10]);
        assert_eq!(&bytes[30..40], b"chat.lobby");
        assert_eq!(&bytes[40..43], b"msg");
        assert_eq!(Frame::decode(&bytes, &limits()).unwrap(), frame);
        // docs/protocol.md, appendix 14.2.
        let vector = "01 06 22 03 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 2a \
                      02 0a 63 68 61 74 2e 6c 6f 62 62 79 6d 73 67 7b 7d";
        let vector: Vec<u8> = vector
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        assert_eq!(&bytes[..], &vector[..]);

        let user = frame.clone().with_position(Some(Position {
            stream: StreamRef::User,
            epoch: 1,
            offset: 1,
        }));
        let bytes = user.encode();
        assert_eq!(bytes.len(), 12 + 18 + 3 + 2);
        assert_eq!(Frame::decode(&bytes, &limits()).unwrap(), user);
    }

    #[test]
    fn a_bad_position_block_is_refused_not_a_panic() {
        let frame = Frame::new(FrameKind::Push)
            .with_position(Some(Position {
                stream: StreamRef::User,
                epoch: 1,
                offset: 1,
            }))
            .encode();
        for cut in 12..frame.len() {
            assert!(
                Frame::decode(&frame.slice(..cut), &limits()).is_err(),
                "{cut}"
            );
        }
        let mut zero_epoch = frame.to_vec();
        zero_epoch[12..20].copy_from_slice(&[0; 8]);
        assert_eq!(
            Frame::decode(&Bytes::from(zero_epoch), &limits()),
            Err(FrameError::InvalidPosition)
        );
        let mut unknown_stream = frame.to_vec();
        unknown_stream[28] = 9;
        assert_eq!(
            Frame::decode(&Bytes::from(unknown_stream), &limits()),
            Err(FrameError::InvalidPosition)
        );
    }

    #[test]
    fn the_layout_matches_the_protocol_document() {
        let frame = Frame::new(FrameKind::Publish)
            .with_msg_id(0x0102_0304_0506_0708)
            .with_route(Route::new("a.b").unwrap())
            .with_body(BodyCodec::Json, &b"{}"[..]);
        let bytes = frame.encode();
        assert_eq!(
            &bytes[..],
            &[
                1, 5, 2, 3, 1, 2, 3, 4, 5, 6, 7, 8, b'a', b'.', b'b', b'{', b'}'
            ][..]
        );
    }

    #[test]
    fn trace_context_sits_between_header_and_route() {
        let trace = TraceContext {
            trace_id: [0xab; 16],
            span_id: [0xcd; 8],
            flags: 1,
        };
        let frame = Frame::new(FrameKind::Publish).with_trace(Some(trace));
        let bytes = frame.encode();
        assert_eq!(bytes.len(), FIXED_HEADER_LEN + TRACE_CONTEXT_LEN);
        assert_eq!(bytes[2], Flags::TRACE);
        assert_eq!(&bytes[12..28], &[0xab; 16]);
        assert_eq!(&bytes[28..36], &[0xcd; 8]);
        assert_eq!(bytes[36], 1);
        assert_eq!(Frame::decode(&bytes, &limits()).unwrap().trace, Some(trace));
    }

    #[test]
    fn decoding_does_not_copy_the_body() {
        let frame = Frame::new(FrameKind::Publish).with_body(BodyCodec::Raw, vec![7u8; 1000]);
        let encoded = frame.encode();
        let decoded = Frame::decode(&encoded, &limits()).unwrap();
        let start = encoded.as_ptr() as usize;
        let body = decoded.body.as_ptr() as usize;
        assert_eq!(
            body - start,
            FIXED_HEADER_LEN,
            "body must point into the input buffer"
        );
    }

    #[test]
    fn truncated_headers_are_reported_with_sizes() {
        let full = Frame::new(FrameKind::Publish)
            .with_route(Route::new("x.y").unwrap())
            .with_trace(Some(TraceContext {
                trace_id: [1; 16],
                span_id: [2; 8],
                flags: 0,
            }))
            .encode();
        for cut in 0..(FIXED_HEADER_LEN + TRACE_CONTEXT_LEN + 3) {
            let err = Frame::decode(&full.slice(..cut), &limits()).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { got, .. } if got == cut),
                "{cut}: {err}"
            );
        }
    }

    #[test]
    fn each_bad_header_field_has_its_own_error() {
        let good = Frame::new(FrameKind::Ack).encode().to_vec();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            Frame::decode(&Bytes::from(b), &limits()).unwrap_err()
        };
        assert_eq!(with(0, 2), FrameError::UnsupportedVersion(2));
        assert_eq!(with(0, 0), FrameError::UnsupportedVersion(0));
        assert_eq!(with(1, 0), FrameError::UnknownKind(0));
        assert_eq!(with(1, 200), FrameError::UnknownKind(200));
        assert_eq!(with(2, 0b0100_0000), FrameError::ReservedFlags(0b0100_0000));
        assert_eq!(with(2, 0b1000_0000), FrameError::ReservedFlags(0b1000_0000));
        assert_eq!(with(2, 0b0000_0011), FrameError::UnknownCodec(3));
    }

    /// docs/protocol.md, appendix 14.2: the frames the decoder must refuse, each derived
    /// from the 12-byte ack frame, exactly as the table lists them.
    #[test]
    fn the_appendix_refusal_vectors_decode_to_their_errors() {
        let ack = [1u8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let with = |i: usize, v: u8, tail: &[u8]| {
            let mut b = ack.to_vec();
            b[i] = v;
            b.extend_from_slice(tail);
            Frame::decode(&Bytes::from(b), &limits())
        };
        assert_eq!(with(0, 0x02, &[]), Err(FrameError::UnsupportedVersion(2)));
        assert_eq!(with(0, 0x00, &[]), Err(FrameError::UnsupportedVersion(0)));
        assert_eq!(with(1, 0x00, &[]), Err(FrameError::UnknownKind(0)));
        assert_eq!(with(1, 0xc8, &[]), Err(FrameError::UnknownKind(0xc8)));
        assert_eq!(with(2, 0x40, &[]), Err(FrameError::ReservedFlags(0x40)));
        assert_eq!(with(2, 0x03, &[]), Err(FrameError::UnknownCodec(3)));
        assert_eq!(
            with(2, 0x08, &[0; 25]),
            Err(FrameError::InvalidTraceContext)
        );
        assert_eq!(
            with(3, 0x03, b"a*b"),
            Err(FrameError::InvalidRoute(RouteError::BadByte {
                byte: 0x2a,
                at: 1
            }))
        );
        assert_eq!(
            Frame::decode(&Bytes::copy_from_slice(&ack[..11]), &limits()),
            Err(FrameError::Truncated {
                needed: 12,
                got: 11
            })
        );
        // 0x10 is the receipt bit (section 3), not a reserved one.
        assert!(with(2, 0x10, &[]).is_ok_and(|f| f.flags.receipt()));
    }

    #[test]
    fn route_limits_and_shape_are_enforced() {
        let tight = Limits {
            max_route_len: 4,
            ..Limits::default()
        };
        let frame = Frame::new(FrameKind::Publish).with_route(Route::new("abcde").unwrap());
        assert_eq!(
            Frame::decode(&frame.encode(), &tight).unwrap_err(),
            FrameError::RouteTooLong { len: 5, max: 4 }
        );
        let mut raw = Frame::new(FrameKind::Publish).encode().to_vec();
        raw[3] = 3;
        raw.extend_from_slice(b"a*b");
        assert_eq!(
            Frame::decode(&Bytes::from(raw), &limits()).unwrap_err(),
            FrameError::InvalidRoute(RouteError::BadByte { byte: b'*', at: 1 })
        );
        assert_eq!(Route::new("a..b"), Err(RouteError::EmptyToken));
        assert_eq!(Route::new(".a"), Err(RouteError::EmptyToken));
        assert_eq!(Route::new("a."), Err(RouteError::EmptyToken));
        assert_eq!(Route::new(&"a".repeat(256)), Err(RouteError::TooLong));
        assert!(Route::new("").unwrap().is_empty());
        assert!(Route::new("agent.v1.result").is_ok());
        assert!(matches!(
            Route::new("a b"),
            Err(RouteError::BadByte { byte: b' ', .. })
        ));
        assert!(matches!(
            Route::new("a>"),
            Err(RouteError::BadByte { byte: b'>', .. })
        ));
    }

    #[test]
    fn oversized_bodies_are_refused_with_sizes() {
        let tight = Limits {
            max_body_len: 10,
            ..Limits::default()
        };
        let frame = Frame::new(FrameKind::Publish).with_body(BodyCodec::Raw, vec![0u8; 11]);
        let err = Frame::decode(&frame.encode(), &tight).unwrap_err();
        assert_eq!(err, FrameError::BodyTooLarge { len: 11, max: 10 });
        assert_eq!(err.close_code(), crate::close::CloseCode::FrameTooLarge);
        let ok = Frame::new(FrameKind::Publish).with_body(BodyCodec::Raw, vec![0u8; 10]);
        assert!(Frame::decode(&ok.encode(), &tight).is_ok());
    }

    #[test]
    fn all_zero_trace_context_is_invalid() {
        let mut raw = Frame::new(FrameKind::Publish).encode().to_vec();
        raw[2] = Flags::TRACE;
        raw.extend_from_slice(&[0u8; TRACE_CONTEXT_LEN]);
        assert_eq!(
            Frame::decode(&Bytes::from(raw), &limits()).unwrap_err(),
            FrameError::InvalidTraceContext
        );
    }

    #[test]
    fn flags_keep_codec_and_compression() {
        let f = Flags::new(BodyCodec::Json)
            .with_compressed(true)
            .with_receipt(true);
        assert_eq!(f.codec(), BodyCodec::Json);
        assert!(f.compressed());
        assert!(f.receipt());
        assert_eq!(f.bits(), 0b0001_0110);
        assert_eq!(Flags::from_bits(f.bits()).unwrap(), f);
        for codec in [BodyCodec::Raw, BodyCodec::MsgPack, BodyCodec::Json] {
            assert_eq!(BodyCodec::parse(codec.as_str()), Some(codec));
        }
    }
}
