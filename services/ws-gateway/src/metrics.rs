//! Prometheus metrics of one gateway replica. Handles to every labelled series the hot path
//! touches are resolved once at start-up, so counting a frame is one atomic add.

use messages::{CloseCode, FrameKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label set with one `reason`-like label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// Label set for frame kinds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

/// Why an upgrade was refused.
#[derive(Debug, Clone, Copy)]
pub enum Reject {
    /// Token missing or invalid.
    Unauthorized,
    /// At the connection limit.
    Capacity,
    /// No NATS, no lease, or draining.
    NotReady,
    /// The user already holds its maximum number of connections.
    UserLimit,
    /// The source address already holds its maximum number of connections.
    IpLimit,
}

/// Every metric of the gateway.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open connections.
    pub connections: Gauge,
    /// Open relay connections (ADR 0015); each also counts in `connections`' sockets.
    pub relays: Gauge,
    /// Streams open on relay connections (each usually one downstream's connection).
    pub relay_streams: Gauge,
    /// Bytes moved on relay connections, both ways, frame headers included.
    pub relay_bytes: Counter,
    /// Upgrades accepted.
    pub accepted: Counter,
    /// Long-poll sessions moved to a WebSocket.
    pub longpoll_upgraded: Counter,
    rejected: [Counter; 5],
    frames_in: Vec<Counter>,
    /// Bytes received in binary frames.
    pub bytes_in: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// Push frames handed to a client's queue.
    pub pushes_delivered: Counter,
    /// Pushes dropped because their `ws-expires` had passed.
    pub pushes_expired: Counter,
    /// Bus messages that could not be turned into a push (bad headers).
    pub pushes_invalid: Counter,
    closes: Vec<(CloseCode, Counter)>,
    /// Heartbeats that arrived late (interval reset to base).
    pub heartbeat_late: Counter,
    /// Frames that failed to decode.
    pub frame_errors: Counter,
    /// Frames dropped by the per-connection rate limit.
    pub rate_limited: Counter,
    /// Messages that could not be handed to NATS (disconnected, queue full, error).
    pub publish_errors: Counter,
    /// Messages handed to NATS.
    pub published: Counter,
    /// 1 while ready.
    pub ready: Gauge,
    /// Leased worker id (-1 without a lease).
    pub worker_id: Gauge,
    /// Per-hop latency from the messages' `ws-hop` stamps.
    pub hops: servicekit::hops::HopLatency,
    /// TLS certificate reloads: `[ok, error]`.
    tls_reloads: [Counter; 2],
    /// Recoveries answered (ADR 0017): `[recovered, not_recovered]`.
    recoveries: [Counter; 2],
    /// Pushes sent by recoveries (also counted in `pushes_delivered`).
    pub pushes_replayed: Counter,
}

impl Metrics {
    /// Registers everything under the `ws_gateway` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ws_gateway");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let relays = Gauge::default();
        registry.register("relays", "Open relay connections", relays.clone());
        let relay_streams = Gauge::default();
        registry.register(
            "relay_streams",
            "Streams open on relay connections",
            relay_streams.clone(),
        );
        let relay_bytes = Counter::default();
        registry.register(
            "relay_bytes",
            "Bytes of relay frames received and sent",
            relay_bytes.clone(),
        );
        let accepted = Counter::default();
        registry.register("accepted", "WebSocket upgrades accepted", accepted.clone());
        let longpoll_upgraded = Counter::default();
        registry.register(
            "longpoll_upgraded",
            "Long-poll sessions moved to a WebSocket",
            longpoll_upgraded.clone(),
        );
        let rejected_family = Family::<Reason, Counter>::default();
        registry.register(
            "rejected",
            "WebSocket upgrades refused, by reason",
            rejected_family.clone(),
        );
        let rejected = [
            "unauthorized",
            "capacity",
            "not_ready",
            "user_limit",
            "ip_limit",
        ]
        .map(|r| {
            rejected_family
                .get_or_create(&Reason { reason: r.into() })
                .clone()
        });
        let frames_family = Family::<Kind, Counter>::default();
        registry.register(
            "frames_in",
            "Frames received from clients, by kind",
            frames_family.clone(),
        );
        let frames_in = FrameKind::ALL
            .iter()
            .map(|k| {
                frames_family
                    .get_or_create(&Kind {
                        kind: k.as_str().into(),
                    })
                    .clone()
            })
            .collect();
        let bytes_in = Counter::default();
        registry.register("bytes_in", "Bytes received from clients", bytes_in.clone());
        let frames_out = Counter::default();
        registry.register(
            "frames_out",
            "Frames written to clients",
            frames_out.clone(),
        );
        let bytes_out = Counter::default();
        registry.register("bytes_out", "Bytes written to clients", bytes_out.clone());
        let pushes_delivered = Counter::default();
        registry.register(
            "pushes_delivered",
            "Push frames queued to clients",
            pushes_delivered.clone(),
        );
        let pushes_expired = Counter::default();
        registry.register(
            "pushes_expired",
            "Pushes dropped after their expiry",
            pushes_expired.clone(),
        );
        let pushes_invalid = Counter::default();
        registry.register(
            "pushes_invalid",
            "Bus messages with invalid push headers",
            pushes_invalid.clone(),
        );
        let closes_family = Family::<Reason, Counter>::default();
        registry.register(
            "closes",
            "Connections closed by the gateway, by close code",
            closes_family.clone(),
        );
        let closes = CloseCode::ALL
            .iter()
            .map(|c| {
                (
                    *c,
                    closes_family
                        .get_or_create(&Reason {
                            reason: c.as_str().into(),
                        })
                        .clone(),
                )
            })
            .collect();
        let heartbeat_late = Counter::default();
        registry.register(
            "heartbeat_late",
            "Heartbeats that arrived late",
            heartbeat_late.clone(),
        );
        let frame_errors = Counter::default();
        registry.register(
            "frame_errors",
            "Client frames that failed to decode",
            frame_errors.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Client frames dropped by the rate limit",
            rate_limited.clone(),
        );
        let publish_errors = Counter::default();
        registry.register(
            "nats_publish_errors",
            "Messages that could not be handed to NATS",
            publish_errors.clone(),
        );
        let published = Counter::default();
        registry.register(
            "nats_published",
            "Messages handed to NATS",
            published.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 while the replica is ready", ready.clone());
        let worker_id = Gauge::default();
        worker_id.set(-1);
        registry.register(
            "worker_id",
            "Leased Snowflake worker id (-1 without a lease)",
            worker_id.clone(),
        );
        let hops = servicekit::hops::HopLatency::register(&mut registry);
        let tls_family = Family::<Reason, Counter>::default();
        registry.register(
            "tls_reloads",
            "TLS certificate reloads, by result (ok, error)",
            tls_family.clone(),
        );
        let tls_reloads = ["ok", "error"].map(|r| {
            tls_family
                .get_or_create(&Reason { reason: r.into() })
                .clone()
        });
        let recoveries_family = Family::<Reason, Counter>::default();
        registry.register(
            "recoveries",
            "Recoveries answered, by result (recovered, not_recovered)",
            recoveries_family.clone(),
        );
        let recoveries = ["recovered", "not_recovered"].map(|r| {
            recoveries_family
                .get_or_create(&Reason { reason: r.into() })
                .clone()
        });
        let pushes_replayed = Counter::default();
        registry.register(
            "pushes_replayed",
            "Pushes sent by recoveries",
            pushes_replayed.clone(),
        );
        Metrics {
            registry,
            connections,
            relays,
            relay_streams,
            relay_bytes,
            accepted,
            longpoll_upgraded,
            rejected,
            frames_in,
            bytes_in,
            frames_out,
            bytes_out,
            pushes_delivered,
            pushes_expired,
            pushes_invalid,
            closes,
            heartbeat_late,
            frame_errors,
            rate_limited,
            publish_errors,
            published,
            ready,
            worker_id,
            hops,
            tls_reloads,
            recoveries,
            pushes_replayed,
        }
    }

    /// Counts a recovery's answer.
    pub fn recovery(&self, recovered: bool) {
        self.recoveries[usize::from(!recovered)].inc();
    }

    /// Counts a TLS certificate reload attempt.
    pub fn tls_reloaded(&self, ok: bool) {
        self.tls_reloads[usize::from(!ok)].inc();
    }

    /// Counts a refused upgrade.
    pub fn rejected(&self, reason: Reject) {
        self.rejected[reason as usize].inc();
    }

    /// Counts a received frame.
    pub fn frame_in(&self, kind: FrameKind) {
        if let Some(c) = self.frames_in.get(usize::from(kind as u8).wrapping_sub(1)) {
            c.inc();
        }
    }

    /// Closes with `code` so far.
    pub fn closes_of(&self, code: CloseCode) -> u64 {
        self.closes
            .iter()
            .find(|(k, _)| *k == code)
            .map_or(0, |(_, c)| c.get())
    }

    /// Counts a close with `code`.
    pub fn closed(&self, code: CloseCode) {
        if let Some((_, c)) = self.closes.iter().find(|(k, _)| *k == code) {
            c.inc();
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        servicekit::http::encode_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
