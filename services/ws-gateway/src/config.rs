//! Gateway configuration: command-line flags, each with a `WS_GATEWAY_*` environment
//! variable, turned into a validated [`Config`]. Tests build a [`Config`] directly.
//!
//! Limits that hold under attack (docs/operations.md, "Limits", lists them all): the
//! replica's connection maximum (HTTP 503 beyond it; actix's own per-worker accept limit is
//! derived from it, see [`Config::accept_limit_per_worker`], so that ours is the one that
//! answers), connections per user and per source address (HTTP 429 beyond them), rooms per
//! socket (error 429 on the join), and the frame rate, which WebSocket pings count against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use messages::payload::HeartbeatParams;
use messages::{GatewayId, Limits};
use servicekit::tls::ReloadableCert;

use crate::auth::{KeyError, Keys};

/// SO_SNDBUF asked for on client sockets: 128 KiB, which Linux doubles to 256 KiB. Without
/// it a client that stops reading holds up to `tcp_wmem` max (4 MiB) of kernel memory until
/// the write stalls (docs/reliability.md, "Slow and hostile clients"); 256 KiB still carries
/// 20 Mbit/s per socket at 100 ms round trip, far above what a push stream needs.
pub(crate) const DEFAULT_SEND_BUFFER: usize = 128 * 1024;

/// Command-line flags and environment variables.
#[derive(Debug, Parser)]
#[command(
    name = "ws-gateway",
    version,
    about = "WebSocket gateway: sockets <-> NATS"
)]
pub struct Args {
    /// Address to listen on for WebSocket and HTTP.
    #[arg(long, env = "WS_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// NATS server URLs, comma-separated.
    #[arg(
        long,
        env = "WS_GATEWAY_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Stable instance name of this replica (leases its worker id; subject token).
    /// Defaults to the host name.
    #[arg(long, env = "WS_GATEWAY_INSTANCE")]
    pub instance: Option<String>,
    /// Actix worker threads (0 = one per core).
    #[arg(long, env = "WS_GATEWAY_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// HS256 shared secret for client tokens (at least 32 bytes).
    #[arg(long, env = "WS_GATEWAY_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<String>,
    /// File with the Ed25519 public key (PEM) for EdDSA client tokens.
    #[arg(long, env = "WS_GATEWAY_JWT_ED25519_PUBLIC_KEY_FILE")]
    pub jwt_ed25519_public_key_file: Option<PathBuf>,
    /// File with the agent-token public key(s) (Ed25519, PEM; several during a rotation).
    /// Agent tokens verify only against these, never against the app keys; without the
    /// file no agent can connect.
    #[arg(long, env = "WS_GATEWAY_AGENT_TOKEN_PUBLIC_KEY_FILE")]
    pub agent_token_public_key_file: Option<PathBuf>,
    /// Allowed clock skew when checking token expiry, seconds.
    #[arg(long, env = "WS_GATEWAY_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,
    /// Heartbeat base interval, ms.
    #[arg(long, env = "WS_GATEWAY_HEARTBEAT_BASE_MS", default_value_t = 10_000)]
    pub heartbeat_base_ms: u32,
    /// Heartbeat growth step, ms.
    #[arg(long, env = "WS_GATEWAY_HEARTBEAT_STEP_MS", default_value_t = 10_000)]
    pub heartbeat_step_ms: u32,
    /// Heartbeat ceiling, ms.
    #[arg(long, env = "WS_GATEWAY_HEARTBEAT_MAX_MS", default_value_t = 60_000)]
    pub heartbeat_max_ms: u32,
    /// On-time beats before each growth step.
    #[arg(long, env = "WS_GATEWAY_HEARTBEAT_GROW_AFTER", default_value_t = 3)]
    pub heartbeat_grow_after: u32,
    /// Slack after the interval before a silent session is closed, ms.
    #[arg(long, env = "WS_GATEWAY_HEARTBEAT_GRACE_MS", default_value_t = 20_000)]
    pub heartbeat_grace_ms: u32,
    /// How often last-seen times are sent to the bus in batches, ms. Keep it at most
    /// ws-api's presence TTL / 4.5 (10 s against the default 45 s): a record is then
    /// refreshed by one of two batches before it could be swept, so one lost batch loses
    /// no session.
    #[arg(long, env = "WS_GATEWAY_PRESENCE_SYNC_MS", default_value_t = 10_000)]
    pub presence_sync_ms: u64,
    /// How often the replica publishes its counters for the operator console
    /// (`ws.stats.<instance>`), ms; 0 turns it off.
    #[arg(long, env = "WS_GATEWAY_STATS_MS", default_value_t = 5_000)]
    pub stats_ms: u64,
    /// Largest frame body accepted from a client, bytes.
    #[arg(long, env = "WS_GATEWAY_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Longest route accepted, bytes (at most 255).
    #[arg(long, env = "WS_GATEWAY_MAX_ROUTE_LEN", default_value_t = 128)]
    pub max_route_len: usize,
    /// Sustained frames per second allowed per connection.
    #[arg(long, env = "WS_GATEWAY_RATE_PER_SEC", default_value_t = 50)]
    pub rate_per_sec: u32,
    /// Burst of frames allowed per connection above the sustained rate.
    #[arg(long, env = "WS_GATEWAY_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,
    /// Connections this replica accepts before answering 503.
    #[arg(long, env = "WS_GATEWAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Connections one user id (of one client kind) may hold on this replica before further
    /// upgrades are answered 429; 0 disables the cap.
    #[arg(
        long,
        env = "WS_GATEWAY_MAX_CONNECTIONS_PER_USER",
        default_value_t = 32
    )]
    pub max_connections_per_user: usize,
    /// Connections one source address (IPv6: one /64) may hold on this replica before
    /// further upgrades are answered 429; 0 disables the cap (behind a proxy that hides
    /// client addresses, every client has the proxy's address).
    #[arg(
        long,
        env = "WS_GATEWAY_MAX_CONNECTIONS_PER_IP",
        default_value_t = 1_000
    )]
    pub max_connections_per_ip: usize,
    /// Rooms one socket may be in (joined or asked for); a join beyond is refused with 429.
    #[arg(long, env = "WS_GATEWAY_MAX_ROOMS_PER_SOCKET", default_value_t = 100)]
    pub max_rooms_per_socket: usize,
    /// Frames queued for one client before it is closed as a slow consumer.
    #[arg(long, env = "WS_GATEWAY_OUTBOUND_QUEUE", default_value_t = 512)]
    pub outbound_queue: usize,
    /// A write that cannot make progress for this long closes the client as slow, ms.
    #[arg(long, env = "WS_GATEWAY_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,
    /// Kernel send buffer of each client socket, bytes (SO_SNDBUF, which Linux doubles for
    /// its bookkeeping); bounds what a client that stops reading holds in kernel memory.
    /// 0 leaves the kernel's auto-tuning (up to `net.ipv4.tcp_wmem` max, 4 MiB by default).
    #[arg(long, env = "WS_GATEWAY_SOCKET_SEND_BUFFER", default_value_t = DEFAULT_SEND_BUFFER)]
    pub socket_send_buffer: usize,
    /// How long a client's join/leave waits for the services' answer before a timeout error, ms.
    #[arg(long, env = "WS_GATEWAY_REQUEST_TIMEOUT_MS", default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// Most pushes one recovery replays; a longer gap is answered `recovered: false`.
    /// Capped at half the outbound queue (the replay is queued at once).
    #[arg(long, env = "WS_GATEWAY_MAX_REPLAY", default_value_t = 256)]
    pub max_replay: u64,
    /// Window over which a drain spreads clients' reconnects, ms.
    #[arg(long, env = "WS_GATEWAY_DRAIN_WINDOW_MS", default_value_t = 10_000)]
    pub drain_window_ms: u64,
    /// After NATS has been unreachable this long, the replica sends its clients to other
    /// replicas (reconnect frames spread over the drain window, close 4003), ms; 0 keeps
    /// them however long the outage lasts.
    #[arg(long, env = "WS_GATEWAY_BUS_LOSS_SHED_MS", default_value_t = 5_000)]
    pub bus_loss_shed_ms: u64,
    /// Hard deadline for the whole shutdown, ms.
    #[arg(
        long,
        env = "WS_GATEWAY_SHUTDOWN_DEADLINE_MS",
        default_value_t = 30_000
    )]
    pub shutdown_deadline_ms: u64,
    /// JetStream KV bucket holding worker-id leases.
    #[arg(
        long,
        env = "WS_GATEWAY_LEASE_BUCKET",
        default_value = "ws_gateway_workers"
    )]
    pub lease_bucket: String,
    /// Worker-id lease time to live, seconds.
    #[arg(long, env = "WS_GATEWAY_LEASE_TTL_SECS", default_value_t = 30)]
    pub lease_ttl_secs: u64,
    /// Replicas of the lease bucket (3 on a 3-node cluster).
    #[arg(long, env = "WS_GATEWAY_LEASE_REPLICAS", default_value_t = 1)]
    pub lease_replicas: usize,
    /// Certificate chain (PEM, leaf first) for `wss://`: with `--tls-key`, the gateway
    /// terminates TLS itself. Replaced without dropping connections when the file changes
    /// or on SIGHUP.
    #[arg(long, env = "WS_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "WS_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often the certificate files are checked for changes, seconds (0: only on SIGHUP).
    #[arg(long, env = "WS_GATEWAY_TLS_RELOAD_SECS", default_value_t = 10)]
    pub tls_reload_secs: u64,
    /// Serve HTTP long-polling on `/lp` (the fallback for clients whose WebSocket does not
    /// get through; docs/protocol.md section 1.4).
    #[arg(long, env = "WS_GATEWAY_LONGPOLL", default_value_t = true, action = clap::ArgAction::Set)]
    pub longpoll: bool,
    /// Longest a long-poll `GET` is held open waiting for frames, ms.
    #[arg(long, env = "WS_GATEWAY_LONGPOLL_WAIT_MS", default_value_t = 25_000)]
    pub longpoll_wait_ms: u64,
    /// Largest long-poll `POST` body, bytes; also the most bytes of earlier POSTs a session
    /// may hold unread.
    #[arg(
        long,
        env = "WS_GATEWAY_LONGPOLL_MAX_POST_BYTES",
        default_value_t = 256 * 1024
    )]
    pub longpoll_max_post_bytes: usize,
    /// Print a development token for this user id (signed with the HS256 secret) and exit.
    #[arg(long, value_name = "USER")]
    pub mint_token: Option<String>,
    /// Client kind for `--mint-token`: `app` or `agent`.
    #[arg(long, default_value = "app")]
    pub mint_kind: String,
    /// Rooms for `--mint-token`, comma-separated.
    #[arg(long, default_value = "")]
    pub mint_rooms: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "WS_GATEWAY_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Trace export (standard `OTEL_*` variables).
    #[command(flatten)]
    pub telemetry: servicekit::telemetry::TelemetryArgs,
}

/// A configuration problem, reported before anything starts (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Token keys.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// Reading the public key file.
    #[error("reading {path}: {source}")]
    KeyFile {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The instance name is not a valid subject token.
    #[error("instance name {0:?} is not valid: {1}")]
    Instance(String, messages::IdError),
    /// The TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] servicekit::tls::TlsError),
    /// A value out of range.
    #[error("{0}")]
    Invalid(&'static str),
}

/// Validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URLs, comma-separated.
    pub nats_url: String,
    /// This replica's stable name.
    pub instance: GatewayId,
    /// Actix worker threads (0 = one per core).
    pub workers: usize,
    /// Token verification keys.
    pub keys: Keys,
    /// Heartbeat parameters sent in the welcome frame.
    pub heartbeat: HeartbeatParams,
    /// Period of presence batches to the bus.
    pub presence_sync: Duration,
    /// Period of the stats envelope for the operator console; `None`: not published.
    pub stats_interval: Option<Duration>,
    /// Frame limits.
    pub limits: Limits,
    /// Sustained frames per second per connection.
    pub rate_per_sec: u32,
    /// Burst above the sustained rate.
    pub rate_burst: u32,
    /// Connections accepted before 503.
    pub max_connections: usize,
    /// Connections per user id and client kind before 429 (0: unlimited).
    pub max_connections_per_user: usize,
    /// Connections per source address (IPv6 /64) before 429 (0: unlimited).
    pub max_connections_per_ip: usize,
    /// Rooms per socket, joined or pending; joins beyond are refused with 429.
    pub max_rooms_per_socket: usize,
    /// Outbound frames queued per connection before a slow-consumer close.
    pub outbound_queue: usize,
    /// Stalled-write limit before a slow-consumer close.
    pub write_timeout: Duration,
    /// SO_SNDBUF for client sockets, bytes (`None`: the kernel's auto-tuning).
    pub socket_send_buffer: Option<usize>,
    /// How long a forwarded join/leave waits for the services' answer.
    pub request_timeout: Duration,
    /// Most pushes one recovery replays (ADR 0017); see [`Config::replay_cap`].
    pub max_replay: u64,
    /// Window over which a drain spreads reconnects.
    pub drain_window: Duration,
    /// NATS outage after which the clients are sent elsewhere (`None`: never).
    pub bus_loss_shed: Option<Duration>,
    /// Hard deadline for shutdown.
    pub shutdown_deadline: Duration,
    /// Lease bucket name.
    pub lease_bucket: String,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Lease bucket replicas.
    pub lease_replicas: usize,
    /// The certificate `wss://` is served with; plain `ws://` without one.
    pub tls: Option<Arc<ReloadableCert>>,
    /// How often the certificate files are checked for changes (`None`: only on SIGHUP).
    pub tls_reload: Option<Duration>,
    /// Serve long-polling on `/lp`.
    pub longpoll: bool,
    /// Longest a poll is held open.
    pub longpoll_wait: Duration,
    /// Largest POST body (and most unread POSTed bytes per session).
    pub longpoll_max_post: usize,
}

impl Config {
    /// Defaults for everything but the bus, the name and the keys; tests start here.
    pub fn new(nats_url: impl Into<String>, instance: GatewayId, keys: Keys) -> Self {
        Config {
            nats_url: nats_url.into(),
            instance,
            workers: 0,
            keys,
            heartbeat: HeartbeatParams {
                base_ms: 10_000,
                step_ms: 10_000,
                max_ms: 60_000,
                grow_after: 3,
                grace_ms: 20_000,
            },
            presence_sync: Duration::from_secs(10),
            stats_interval: Some(Duration::from_secs(5)),
            limits: Limits::default(),
            rate_per_sec: 50,
            rate_burst: 100,
            max_connections: 100_000,
            max_connections_per_user: 32,
            max_connections_per_ip: 1_000,
            max_rooms_per_socket: 100,
            outbound_queue: 512,
            write_timeout: Duration::from_secs(10),
            socket_send_buffer: Some(DEFAULT_SEND_BUFFER),
            request_timeout: Duration::from_secs(5),
            max_replay: 256,
            drain_window: Duration::from_secs(10),
            bus_loss_shed: Some(Duration::from_secs(5)),
            shutdown_deadline: Duration::from_secs(30),
            lease_bucket: "ws_gateway_workers".into(),
            lease_ttl: Duration::from_secs(30),
            lease_replicas: 1,
            tls: None,
            tls_reload: Some(Duration::from_secs(10)),
            longpoll: true,
            longpoll_wait: Duration::from_secs(25),
            longpoll_max_post: 256 * 1024,
        }
    }

    /// Validates flags into a configuration.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let public_pem = match &args.jwt_ed25519_public_key_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| ConfigError::KeyFile {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let keys = Keys::new(
            args.jwt_hs256_secret.as_deref().map(str::as_bytes),
            public_pem.as_deref(),
            args.jwt_leeway_secs,
        )?;
        let keys = match &args.agent_token_public_key_file {
            Some(path) => keys.with_agent_keys(&std::fs::read(path).map_err(|source| {
                ConfigError::KeyFile {
                    path: path.clone(),
                    source,
                }
            })?)?,
            None => keys,
        };
        let instance = match &args.instance {
            Some(name) => name.clone(),
            None => hostname(),
        };
        let instance = GatewayId::new(instance.clone())
            .map_err(|e| ConfigError::Instance(instance.clone(), e))?;
        let mut config = Config::new(args.nats_url.clone(), instance, keys);
        config.workers = args.workers;
        config.heartbeat = HeartbeatParams {
            base_ms: args.heartbeat_base_ms,
            step_ms: args.heartbeat_step_ms,
            max_ms: args.heartbeat_max_ms,
            grow_after: args.heartbeat_grow_after,
            grace_ms: args.heartbeat_grace_ms,
        };
        config.presence_sync = Duration::from_millis(args.presence_sync_ms);
        config.stats_interval = (args.stats_ms > 0).then(|| Duration::from_millis(args.stats_ms));
        config.limits = Limits {
            max_route_len: args.max_route_len,
            max_body_len: args.max_body_bytes,
        };
        config.rate_per_sec = args.rate_per_sec;
        config.rate_burst = args.rate_burst;
        config.max_connections = args.max_connections;
        config.max_connections_per_user = args.max_connections_per_user;
        config.max_connections_per_ip = args.max_connections_per_ip;
        config.max_rooms_per_socket = args.max_rooms_per_socket;
        config.outbound_queue = args.outbound_queue;
        config.write_timeout = Duration::from_millis(args.write_timeout_ms);
        config.socket_send_buffer =
            (args.socket_send_buffer > 0).then_some(args.socket_send_buffer);
        config.request_timeout = Duration::from_millis(args.request_timeout_ms);
        config.max_replay = args.max_replay;
        config.drain_window = Duration::from_millis(args.drain_window_ms);
        config.bus_loss_shed =
            (args.bus_loss_shed_ms > 0).then(|| Duration::from_millis(args.bus_loss_shed_ms));
        config.shutdown_deadline = Duration::from_millis(args.shutdown_deadline_ms);
        config.lease_bucket = args.lease_bucket.clone();
        config.lease_ttl = Duration::from_secs(args.lease_ttl_secs);
        config.lease_replicas = args.lease_replicas;
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config.tls = Some(ReloadableCert::load(cert, key)?);
        }
        config.longpoll = args.longpoll;
        config.longpoll_wait = Duration::from_millis(args.longpoll_wait_ms);
        config.longpoll_max_post = args.longpoll_max_post_bytes;
        config.tls_reload =
            (args.tls_reload_secs > 0).then(|| Duration::from_secs(args.tls_reload_secs));
        config.validate()?;
        Ok(config)
    }

    /// The most pushes one recovery replays: `max_replay`, at most half the outbound queue
    /// (a replay is queued at once, and must not make its client a slow consumer).
    pub fn replay_cap(&self) -> u64 {
        self.max_replay.min((self.outbound_queue / 2) as u64)
    }

    /// Checks ranges that would make the gateway misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let hb = &self.heartbeat;
        if hb.base_ms == 0 || hb.max_ms < hb.base_ms {
            return Err(ConfigError::Invalid("heartbeat: need 0 < base <= max"));
        }
        if self.limits.max_route_len > messages::frame::MAX_ROUTE_LEN {
            return Err(ConfigError::Invalid("max route length is at most 255"));
        }
        if self.rate_per_sec == 0 || self.outbound_queue == 0 {
            return Err(ConfigError::Invalid(
                "rate and outbound queue must be positive",
            ));
        }
        if self.max_connections == 0 || self.max_rooms_per_socket == 0 {
            return Err(ConfigError::Invalid(
                "max connections and max rooms per socket must be positive",
            ));
        }
        if self.longpoll_wait.is_zero()
            || self.longpoll_max_post
                < self.limits.max_frame_len() + messages::longpoll::RECORD_HEADER
        {
            return Err(ConfigError::Invalid(
                "long-poll wait must be positive and the POST limit must hold one frame",
            ));
        }
        if self.socket_send_buffer.is_some_and(|n| n < 4096) {
            return Err(ConfigError::Invalid(
                "socket send buffer must be 0 (the kernel's auto-tuning) or at least 4096 bytes",
            ));
        }
        if self.lease_ttl < Duration::from_secs(3) {
            return Err(ConfigError::Invalid("lease TTL must be at least 3 s"));
        }
        Ok(())
    }
}

/// Connections above the maximum that one actix worker still accepts, so that clients
/// beyond our limit are answered 503 by our own check rather than left in the listen
/// backlog; also room for `/healthz`, `/readyz` and `/metrics` while the replica is full.
pub(crate) const ACCEPT_HEADROOM: usize = 1_024;

impl Config {
    /// The `max_connections` to give each actix worker. Actix counts per worker (default
    /// 25,600) and stops accepting at its limit, leaving further clients hanging in the
    /// backlog; our limit is replica-wide and answers 503. Any one worker may end up holding
    /// every connection of the replica, so each may accept the whole maximum plus headroom
    /// for the refusals (which close their connection at once).
    pub fn accept_limit_per_worker(&self) -> usize {
        self.max_connections.saturating_add(ACCEPT_HEADROOM)
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ws-gateway".to_owned())
        .replace('.', "-")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(max_connections: usize) -> Config {
        let keys = Keys::new(Some(&[7u8; 32]), None, 0).unwrap();
        let mut config = Config::new("nats://x", GatewayId::new("gw").unwrap(), keys);
        config.max_connections = max_connections;
        config
    }

    #[test]
    fn each_worker_accepts_more_than_the_whole_replica_maximum() {
        // The default maximum is above actix's 25,600 per worker: with actix's default, a
        // 2-worker replica stopped accepting near 51k and never answered 503.
        for max in [1, 2, 25_600, 100_000, 1_000_000] {
            let limit = config(max).accept_limit_per_worker();
            assert!(limit > max, "{max}: {limit}");
        }
        assert!(config(100_000).accept_limit_per_worker() > 25_600 * 2);
        assert_eq!(
            config(usize::MAX).accept_limit_per_worker(),
            usize::MAX,
            "no overflow"
        );
    }

    #[test]
    fn limits_have_defaults_and_zero_maximums_are_refused() {
        let args = Args::parse_from(["ws-gateway", "--jwt-hs256-secret", &"s".repeat(32)]);
        let config = Config::from_args(&args).unwrap();
        assert_eq!(
            (
                config.max_connections,
                config.max_connections_per_user,
                config.max_connections_per_ip,
                config.max_rooms_per_socket
            ),
            (100_000, 32, 1_000, 100)
        );
        let mut bad = config.clone();
        bad.max_rooms_per_socket = 0;
        assert!(bad.validate().is_err());
        let mut bad = config;
        bad.max_connections = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn the_socket_send_buffer_is_bounded_by_default_and_zero_leaves_it_to_the_kernel() {
        let secret = "s".repeat(32);
        let parse = |extra: &[&str]| {
            let mut argv = vec!["ws-gateway", "--jwt-hs256-secret", &secret];
            argv.extend_from_slice(extra);
            Config::from_args(&Args::parse_from(argv))
        };
        assert_eq!(
            parse(&[]).unwrap().socket_send_buffer,
            Some(DEFAULT_SEND_BUFFER)
        );
        assert_eq!(
            parse(&["--socket-send-buffer", "0"])
                .unwrap()
                .socket_send_buffer,
            None
        );
        assert_eq!(
            parse(&["--socket-send-buffer", "65536"])
                .unwrap()
                .socket_send_buffer,
            Some(65_536)
        );
        assert!(parse(&["--socket-send-buffer", "100"]).is_err());
    }
}
