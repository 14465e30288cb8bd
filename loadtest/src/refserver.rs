//! What both reference servers of `scenarios/gateway-bench.sh` (`src/bin/ref-tokio.rs`,
//! `src/bin/ref-actix.rs`) share, so they look to the load generator exactly like the
//! gateway: their flags, the gateway's welcome and heartbeat-ack frames, and the push frame
//! built from a bus message the way the gateway builds it. Included by the two binaries
//! with `#[path]`; the load generator itself does not use it.

use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use messages::envelope::PushEnvelope;
use messages::payload::{self, HeartbeatAck, HeartbeatParams, Welcome};
use messages::{BodyCodec, Frame, FrameKind, GatewayId, Limits, SocketId, UserId};

/// Flags of both reference servers.
#[derive(Debug, Parser)]
pub(crate) struct Args {
    /// Address to listen on.
    #[arg(long, env = "REF_LISTEN", default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// NATS server to take broadcast pushes from.
    #[arg(long, env = "REF_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Heartbeat interval announced in the welcome and every ack.
    #[arg(long, env = "REF_HEARTBEAT_MS", default_value_t = 30_000)]
    pub heartbeat_ms: u32,
}

/// What every welcome and ack says.
#[derive(Debug)]
pub(crate) struct Hello {
    /// The name the welcome gives as the gateway.
    pub gateway: GatewayId,
    /// The user id every welcome names.
    pub user: UserId,
    /// Heartbeat interval announced in the welcome and every ack.
    pub heartbeat_ms: u32,
}

impl Hello {
    /// A control frame as the gateway encodes it (MessagePack body).
    pub(crate) fn control<T: serde::Serialize>(kind: FrameKind, msg_id: u64, body: &T) -> Bytes {
        let body = payload::encode_body(BodyCodec::MsgPack, body).unwrap_or_default();
        Frame::new(kind)
            .with_msg_id(msg_id)
            .with_body(BodyCodec::MsgPack, body)
            .encode()
    }

    /// The welcome for socket `socket`.
    pub(crate) fn welcome(&self, socket: u64) -> Bytes {
        let welcome = Welcome {
            socket_id: SocketId(socket),
            user_id: self.user.clone(),
            gateway: self.gateway.clone(),
            heartbeat: HeartbeatParams {
                base_ms: self.heartbeat_ms,
                step_ms: 10_000,
                max_ms: self.heartbeat_ms.max(60_000),
                grow_after: 3,
                grace_ms: 20_000,
            },
            max_body_bytes: u32::try_from(Limits::default().max_body_len).unwrap_or(u32::MAX),
            server_time_ms: servicekit::clock::now_ms(),
            recovery: None,
        };
        Self::control(FrameKind::Welcome, 0, &welcome)
    }

    /// The heartbeat ack for message `msg_id`.
    pub(crate) fn ack(&self, msg_id: u64) -> Bytes {
        let ack = HeartbeatAck {
            next_interval_ms: self.heartbeat_ms,
        };
        Self::control(FrameKind::HeartbeatAck, msg_id, &ack)
    }
}

/// The push frame for a bus message, as the gateway builds it (`None` if its headers are
/// malformed): flags, id, route and trace context from the envelope, body untouched.
pub(crate) fn push_frame(msg: &async_nats::Message) -> Option<Bytes> {
    let envelope = match msg.headers.as_ref() {
        Some(map) => PushEnvelope::from_headers(map).ok()?,
        None => PushEnvelope::default(),
    };
    let frame = Frame {
        kind: FrameKind::Push,
        flags: envelope.flags(),
        msg_id: envelope.msg_id,
        trace: envelope.trace,
        position: None,
        route: envelope.route,
        body: msg.payload.clone(),
    };
    Some(frame.encode())
}
