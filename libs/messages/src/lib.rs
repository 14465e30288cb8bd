//! The wire contract of the system, in one crate that every service and client shares.
//!
//! - [`frame`]: the binary client frame codec (client <-> gateway).
//! - [`command`]: Ed25519-signed envelopes for scheduler -> agent commands.
//! - [`close`]: WebSocket close codes and error-frame codes.
//! - [`compress`]: end-to-end body compression (raw DEFLATE) with bounded inflation.
//! - [`fleet`]: agent <-> scheduler messages and routes.
//! - [`subject`]: NATS subjects, built and parsed.
//! - [`headers`]: NATS header names and per-hop timestamps.
//! - [`envelope`]: typed header sets of every bus message kind (`nats` feature).
//! - [`longpoll`]: the long-polling transport's batch format, session ids and forwarding.
//! - [`ids`]: socket, user, room and gateway ids, validated once.
//! - [`snowflake`]: the socket-id generator.
//! - [`payload`]: typed bodies for control frames and bus payloads.
//! - [`relay`]: the frames a relay agent multiplexes its downstreams' streams with.
//! - [`trace`]: W3C trace context in frames and NATS headers.
//!
//! `docs/protocol.md` describes the same contract for implementers in other languages.

pub mod close;
pub mod command;
pub mod compress;
#[cfg(feature = "nats")]
pub mod envelope;
pub mod fleet;
pub mod frame;
pub mod headers;
pub mod ids;
pub mod longpoll;
pub mod payload;
pub mod relay;
pub mod snowflake;
pub mod subject;
pub mod trace;
pub mod tunnel;

pub use close::{CloseCode, ErrorCode};
pub use frame::{BodyCodec, Flags, Frame, FrameError, FrameHeader, FrameKind, Limits, Route};
pub use ids::{ClientKind, GatewayId, IdError, RoomId, SocketId, UserId};
pub use snowflake::{Snowflake, SnowflakeError};
pub use subject::Subject;
pub use trace::TraceContext;
