//! ws-api configuration: flags with `WS_API_*` environment variables, validated into a
//! [`Config`]. Tests build a [`Config`] directly.

use std::time::Duration;

use clap::Parser;

/// Command-line flags and environment variables.
#[derive(Debug, Parser)]
#[command(name = "ws-api", version, about = "Sessions, rooms and the push API")]
pub struct Args {
    /// Address for the HTTP API.
    #[arg(long, env = "WS_API_LISTEN", default_value = "0.0.0.0:8090")]
    pub listen: String,
    /// NATS server URLs, comma-separated.
    #[arg(long, env = "WS_API_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// API keys accepted as `Authorization: Bearer <key>`, comma-separated (at least one).
    #[arg(long, env = "WS_API_KEYS", hide_env_values = true)]
    pub api_keys: String,
    /// A session with no activity for this long is considered gone, seconds. Must exceed the
    /// gateways' presence sync period with margin.
    #[arg(long, env = "WS_API_PRESENCE_TTL_SECS", default_value_t = 45)]
    pub presence_ttl_secs: u64,
    /// How often stale sessions are swept, seconds.
    #[arg(long, env = "WS_API_SWEEP_SECS", default_value_t = 5)]
    pub sweep_secs: u64,
    /// Room policy: `claims` (the token's `rooms` claim decides) or `open` (anyone may join).
    #[arg(long, env = "WS_API_ROOM_POLICY", default_value = "claims")]
    pub room_policy: String,
    /// Room prefixes anyone may join whatever the policy, comma-separated (e.g. `public.`).
    #[arg(long, env = "WS_API_OPEN_ROOM_PREFIXES", default_value = "")]
    pub open_room_prefixes: String,
    /// Largest push request body, bytes.
    #[arg(long, env = "WS_API_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// JetStream KV replicas (3 on a 3-node cluster).
    #[arg(long, env = "WS_API_KV_REPLICAS", default_value_t = 1)]
    pub kv_replicas: usize,
    /// Enables the demo's development tokens and relay (`/demo/`): the gateway's HS256
    /// secret, with which `POST /demo/token` signs a token for any user id. Development
    /// only: anyone who reaches the endpoint can be anyone. Off (404) when unset.
    #[arg(long, env = "WS_API_DEMO_TOKEN_SECRET", hide_env_values = true)]
    pub demo_token_secret: Option<String>,
    /// The gateway's WebSocket URL the demo page connects to (`ws://host:port/ws`); the
    /// page asks when it is empty.
    #[arg(long, env = "WS_API_DEMO_GATEWAY_URL", default_value = "")]
    pub demo_gateway_url: String,
    /// Room id prefixes whose pushes are kept in history for recovery, comma-separated
    /// (`*`: every room; empty: none).
    #[arg(long, env = "WS_API_HISTORY_ROOM_PREFIXES", default_value = "")]
    pub history_room_prefixes: String,
    /// Keep pushes to users in history for recovery.
    #[arg(long, env = "WS_API_HISTORY_USERS", default_value_t = false)]
    pub history_users: bool,
    /// Pushes kept per history stream (per room, per user): the longest recoverable gap.
    #[arg(long, env = "WS_API_HISTORY_MAX_PER_STREAM", default_value_t = 1000)]
    pub history_max_per_stream: i64,
    /// How long a push stays in history, seconds.
    #[arg(long, env = "WS_API_HISTORY_MAX_AGE_SECS", default_value_t = 3600)]
    pub history_max_age_secs: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "WS_API_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Trace export (standard `OTEL_*` variables).
    #[command(flatten)]
    pub telemetry: servicekit::telemetry::TelemetryArgs,
}

/// Who may join which room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomPolicy {
    /// Only rooms named in the token's `rooms` claim (plus open prefixes).
    Claims,
    /// Any room.
    Open,
}

/// A configuration problem (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value out of range or malformed.
    #[error("{0}")]
    Invalid(String),
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS URLs.
    pub nats_url: String,
    /// Accepted API keys.
    pub api_keys: Vec<String>,
    /// Presence time to live.
    pub presence_ttl: Duration,
    /// Sweep period.
    pub sweep: Duration,
    /// Room policy.
    pub room_policy: RoomPolicy,
    /// Prefixes anyone may join.
    pub open_room_prefixes: Vec<String>,
    /// Push body limit.
    pub max_body_bytes: usize,
    /// KV replicas.
    pub kv_replicas: usize,
    /// Bucket of session records.
    pub sessions_bucket: String,
    /// Bucket of push receipts.
    pub receipts_bucket: String,
    /// How long a join waits for its session to appear (connect and join events may be
    /// handled by different replicas).
    pub session_wait: Duration,
    /// The demo's token secret; `None` disables development tokens and the relay.
    pub demo_token_secret: Option<String>,
    /// The gateway URL the demo page is given.
    pub demo_gateway_url: String,
    /// Which pushes are kept in history (ADR 0017).
    pub history: crate::history::HistoryConfig,
}

impl Config {
    /// Defaults for everything but the bus and the keys.
    pub fn new(nats_url: impl Into<String>, api_keys: Vec<String>) -> Self {
        Config {
            nats_url: nats_url.into(),
            api_keys,
            presence_ttl: Duration::from_secs(45),
            sweep: Duration::from_secs(5),
            room_policy: RoomPolicy::Claims,
            open_room_prefixes: Vec::new(),
            max_body_bytes: 256 * 1024,
            kv_replicas: 1,
            sessions_bucket: "ws_sessions".into(),
            receipts_bucket: "ws_push_receipts".into(),
            session_wait: Duration::from_secs(2),
            demo_token_secret: None,
            demo_gateway_url: String::new(),
            history: crate::history::HistoryConfig::default(),
        }
    }

    /// Validates flags.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let keys = split(&args.api_keys);
        let mut config = Config::new(args.nats_url.clone(), keys);
        config.presence_ttl = Duration::from_secs(args.presence_ttl_secs);
        config.sweep = Duration::from_secs(args.sweep_secs);
        config.room_policy = match args.room_policy.as_str() {
            "claims" => RoomPolicy::Claims,
            "open" => RoomPolicy::Open,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "room policy {other:?}: use claims or open"
                )));
            }
        };
        config.open_room_prefixes = split(&args.open_room_prefixes);
        config.max_body_bytes = args.max_body_bytes;
        config.kv_replicas = args.kv_replicas;
        config.demo_token_secret = args.demo_token_secret.clone().filter(|s| !s.is_empty());
        config.demo_gateway_url = args.demo_gateway_url.clone();
        config.history = crate::history::HistoryConfig {
            room_prefixes: split(&args.history_room_prefixes),
            users: args.history_users,
            max_per_stream: args.history_max_per_stream,
            max_age: Duration::from_secs(args.history_max_age_secs),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would make the service misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api_keys.is_empty() || self.api_keys.iter().any(|k| k.len() < 16) {
            return Err(ConfigError::Invalid(
                "at least one API key of 16+ characters is required".into(),
            ));
        }
        if self
            .demo_token_secret
            .as_ref()
            .is_some_and(|secret| secret.len() < 32)
        {
            return Err(ConfigError::Invalid(
                "the demo token secret (the gateway's HS256 secret) needs 32+ bytes".into(),
            ));
        }
        if self.presence_ttl < Duration::from_secs(1) || self.sweep.is_zero() {
            return Err(ConfigError::Invalid(
                "presence TTL and sweep period must be positive".into(),
            ));
        }
        if self.history.enabled()
            && (self.history.max_per_stream < 1 || self.history.max_age.is_zero())
        {
            return Err(ConfigError::Invalid(
                "history needs a positive count and age bound".into(),
            ));
        }
        Ok(())
    }
}

fn split(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}
