//! Scheduler configuration: flags with `SCHEDULER_*` environment variables, validated into
//! a [`Config`]. Tests build a [`Config`] directly with [`Config::new`].
//!
//! With `SCHEDULER_TLS_CERT` and `SCHEDULER_TLS_KEY` (PEM files: the certificate chain, leaf
//! first, and its private key) the HTTP API, `/healthz` and `/readyz` included, is served
//! over HTTPS only (rustls with ring); both are read at start and a problem with either is
//! a configuration error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use messages::command::CommandSigner;

use crate::trust::{AgentTokens, read_pem};

use crate::auth::{self, ApiKey};

/// Command-line flags and environment variables.
#[derive(Debug, Parser)]
#[command(
    name = "scheduler",
    version,
    about = "Fleet control plane: agents, tasks, results"
)]
pub struct Args {
    /// Address for the HTTP API.
    #[arg(long, env = "SCHEDULER_LISTEN", default_value = "0.0.0.0:8100")]
    pub listen: String,
    /// NATS server URLs, comma-separated.
    #[arg(
        long,
        env = "SCHEDULER_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// API keys accepted as `Authorization: Bearer <secret>`: comma-separated
    /// `name:scope:secret` entries, scope `read` (GET endpoints only) or `operator`
    /// (everything), secrets of 16+ characters; e.g. `ops:operator:<secret>,dash:read:<secret>`.
    /// A bare secret (no `:`) is still accepted as an operator key named `key<position>`.
    #[arg(
        long,
        env = "SCHEDULER_API_KEYS",
        hide_env_values = true,
        default_value = ""
    )]
    pub api_keys: String,
    /// How long an `Idempotency-Key` of `POST /v1/tasks` is remembered, seconds.
    #[arg(long, env = "SCHEDULER_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,
    /// The redb file holding the registry, tasks and results.
    #[arg(long, env = "SCHEDULER_DB", default_value = "scheduler.redb")]
    pub db: PathBuf,
    /// Where uploaded agent artifacts are kept, one file per SHA-256 (default: `artifacts`
    /// beside the database file; on the same shared volume for a standby).
    #[arg(long, env = "SCHEDULER_ARTIFACT_DIR")]
    pub artifact_dir: Option<PathBuf>,
    /// Tunnel streams open at once to one agent.
    #[arg(long, env = "SCHEDULER_TUNNEL_MAX_PER_AGENT", default_value_t = 16)]
    pub tunnel_max_per_agent: usize,
    /// Tunnel streams open at once for one API key (operator).
    #[arg(long, env = "SCHEDULER_TUNNEL_MAX_PER_KEY", default_value_t = 32)]
    pub tunnel_max_per_key: usize,
    /// A tunnel stream without data either way for this long is closed, seconds.
    #[arg(long, env = "SCHEDULER_TUNNEL_IDLE_SECS", default_value_t = 300)]
    pub tunnel_idle_secs: u64,
    /// Largest artifact upload, bytes (held in memory while it is hashed and written).
    #[arg(long, env = "SCHEDULER_MAX_ARTIFACT_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub max_artifact_bytes: u64,
    /// Agent heartbeat period, ms; an agent is offline after three missed periods.
    #[arg(long, env = "SCHEDULER_HEARTBEAT_MS", default_value_t = 10_000)]
    pub heartbeat_ms: u64,
    /// Slack added to a task's own timeout before a dispatched attempt expires, ms: delivery,
    /// start-up and the result's way back take time too.
    #[arg(long, env = "SCHEDULER_DISPATCH_TIMEOUT_MS", default_value_t = 30_000)]
    pub dispatch_timeout_ms: u64,
    /// This instance's stable name, stored in the leader lease (default: the host name).
    #[arg(long, env = "SCHEDULER_INSTANCE")]
    pub instance: Option<String>,
    /// Leader lease TTL, ms: a standby takes over this long after the active instance
    /// stopped refreshing; the active one refreshes every third of it.
    #[arg(long, env = "SCHEDULER_LEASE_TTL_MS", default_value_t = 15_000)]
    pub lease_ttl_ms: u64,
    /// Replicas of the leader-lease bucket (3 on a 3-node NATS cluster, so that losing a
    /// node does not leave every instance unable to lead), 1 to 5.
    #[arg(long, env = "SCHEDULER_LEASE_REPLICAS", default_value_t = 1)]
    pub lease_replicas: usize,
    /// The command-signing key (Ed25519, PKCS#8 PEM): signs every message to agents, whose
    /// pinned public keys must include its public half. Required to serve; generate one
    /// with `scheduler --keygen DIR`.
    #[arg(long, env = "SCHEDULER_COMMAND_KEY_FILE")]
    pub command_key_file: Option<PathBuf>,
    /// How long a signed command stays valid, seconds (agents refuse it afterwards).
    #[arg(long, env = "SCHEDULER_COMMAND_TTL_SECS", default_value_t = 600)]
    pub command_ttl_secs: u64,
    /// The agent-token key (Ed25519, PKCS#8 PEM): signs agent tokens; gateways verify agents
    /// against its public half. Without it the scheduler cannot renew or issue agent
    /// credentials.
    #[arg(long, env = "SCHEDULER_AGENT_TOKEN_KEY_FILE")]
    pub agent_token_key_file: Option<PathBuf>,
    /// Lifetime of the agent tokens the scheduler issues and renews, seconds. A connected
    /// agent gets a new one when half of it has passed.
    #[arg(long, env = "SCHEDULER_AGENT_TOKEN_TTL_SECS", default_value_t = 3600)]
    pub agent_token_ttl_secs: u64,
    /// Generate a command key and an agent-token key (with their public halves) in this
    /// directory and exit.
    #[arg(long, value_name = "DIR")]
    pub keygen: Option<PathBuf>,
    /// Print an agent token for this node (signed with the agent-token key, valid for
    /// `--token-ttl-secs`) and exit: how an agent is enrolled.
    #[arg(long, value_name = "NODE")]
    pub mint_agent_token: Option<String>,
    /// Lifetime of `--mint-agent-token`, seconds.
    #[arg(long, default_value_t = 86_400)]
    pub token_ttl_secs: u64,
    /// PEM certificate chain (leaf first) for serving the API over HTTPS; needs `--tls-key`.
    #[arg(long, env = "SCHEDULER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SCHEDULER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "SCHEDULER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Trace export (standard `OTEL_*` variables).
    #[command(flatten)]
    pub telemetry: servicekit::telemetry::TelemetryArgs,
}

/// How long an `Idempotency-Key` is remembered by default (as long as Stripe keeps them).
pub(crate) const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Shortest leader lease TTL accepted.
pub(crate) const MIN_LEASE_TTL: Duration = Duration::from_millis(300);

/// The host name (the default instance name), or `scheduler` if it cannot be read.
pub(crate) fn host_name() -> String {
    // Linux exposes it here; no extra dependency is needed for one read.
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "scheduler".to_owned())
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
    /// Accepted API keys, with their names and scopes ([`crate::auth`]).
    pub api_keys: Vec<ApiKey>,
    /// How long an `Idempotency-Key` is remembered after the task it created.
    pub idempotency_ttl: Duration,
    /// The redb file.
    pub db_path: PathBuf,
    /// Agent heartbeat period; offline after [`Config::missed_heartbeats`] of them.
    pub heartbeat: Duration,
    /// Periods without a sign of life before an agent is marked offline.
    pub missed_heartbeats: u32,
    /// Slack added to a task's own timeout before a dispatched attempt expires.
    pub dispatch_timeout: Duration,
    /// How often the liveness and deadline sweep runs.
    pub sweep: Duration,
    /// Largest HTTP request body, bytes.
    pub max_body_bytes: usize,
    /// This instance's name in the leader lease.
    pub instance: String,
    /// Leader lease TTL (also the lease bucket's `max_age`).
    pub lease_ttl: Duration,
    /// Replicas of the lease bucket.
    pub lease_replicas: usize,
    /// JetStream key-value bucket of the leader lease.
    pub lease_bucket: String,
    /// Signs every message to agents.
    pub command_key: Arc<CommandSigner>,
    /// How long a signed command stays valid.
    pub command_ttl: Duration,
    /// Issues and renews agent tokens, when configured.
    pub agent_tokens: Option<Arc<AgentTokens>>,
    /// Serve the HTTP API over HTTPS with this configuration; `None` serves plain HTTP.
    pub tls: Option<Arc<servicekit::tls::ServerConfig>>,
    /// Where uploaded agent artifacts are kept.
    pub artifact_dir: PathBuf,
    /// Largest artifact upload, bytes (at most [`messages::fleet::MAX_ARTIFACT_BYTES`]).
    pub max_artifact_bytes: u64,
    /// Tunnel streams open at once to one agent ([`crate::tunnel`]).
    pub tunnel_max_per_agent: usize,
    /// Tunnel streams open at once for one API key.
    pub tunnel_max_per_key: usize,
    /// Idle timeout of a tunnel stream (enforced by both ends).
    pub tunnel_idle: Duration,
}

impl Config {
    /// Defaults for everything but the bus, the keys and the database file. `api_keys` are
    /// plain secrets, each an operator key named `key1`, `key2`, … (set
    /// [`Config::api_keys`] for named and read-only keys).
    pub fn new(
        nats_url: impl Into<String>,
        api_keys: Vec<String>,
        db_path: impl Into<PathBuf>,
    ) -> Self {
        let db_path: PathBuf = db_path.into();
        Config {
            nats_url: nats_url.into(),
            api_keys: ApiKey::legacy(api_keys),
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
            artifact_dir: db_path.with_file_name("artifacts"),
            max_artifact_bytes: 128 * 1024 * 1024,
            db_path,
            heartbeat: Duration::from_secs(10),
            missed_heartbeats: 3,
            dispatch_timeout: Duration::from_secs(30),
            sweep: Duration::from_secs(1),
            max_body_bytes: 64 * 1024,
            instance: host_name(),
            lease_ttl: crate::lease::DEFAULT_TTL,
            lease_replicas: 1,
            lease_bucket: crate::lease::DEFAULT_BUCKET.to_owned(),
            // A throwaway key: tests that run agents set the key those agents pin.
            command_key: Arc::new(CommandSigner::generate()),
            command_ttl: Duration::from_secs(600),
            agent_tokens: None,
            tls: None,
            tunnel_max_per_agent: 16,
            tunnel_max_per_key: 32,
            tunnel_idle: Duration::from_secs(300),
        }
    }

    /// Validates flags.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let mut config = Config::new(args.nats_url.clone(), Vec::new(), args.db.clone());
        config.api_keys =
            auth::parse_keys(&args.api_keys).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.idempotency_ttl = Duration::from_secs(args.idempotency_ttl_secs);
        if let Some(dir) = args
            .artifact_dir
            .clone()
            .filter(|d| !d.as_os_str().is_empty())
        {
            config.artifact_dir = dir;
        }
        config.max_artifact_bytes = args.max_artifact_bytes;
        config.tunnel_max_per_agent = args.tunnel_max_per_agent;
        config.tunnel_max_per_key = args.tunnel_max_per_key;
        config.tunnel_idle = Duration::from_secs(args.tunnel_idle_secs.max(1));
        config.heartbeat = Duration::from_millis(args.heartbeat_ms);
        config.dispatch_timeout = Duration::from_millis(args.dispatch_timeout_ms);
        config.lease_ttl = Duration::from_millis(args.lease_ttl_ms);
        config.lease_replicas = args.lease_replicas;
        let Some(command_key_file) = &args.command_key_file else {
            return Err(ConfigError::Invalid(
                "SCHEDULER_COMMAND_KEY_FILE is required: agents act only on signed commands \
                 (generate keys with `scheduler --keygen DIR`, see docs/security.md)"
                    .into(),
            ));
        };
        let pem = read_pem(command_key_file).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.command_key =
            Arc::new(CommandSigner::from_pem(&pem).map_err(|e| {
                ConfigError::Invalid(format!("{}: {e}", command_key_file.display()))
            })?);
        config.command_ttl = Duration::from_secs(args.command_ttl_secs);
        if let Some(path) = &args.agent_token_key_file {
            let pem = read_pem(path).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            let ttl = Duration::from_secs(args.agent_token_ttl_secs);
            config.agent_tokens =
                Some(Arc::new(AgentTokens::from_pem(&pem, ttl).map_err(|e| {
                    ConfigError::Invalid(format!("{}: {e}", path.display()))
                })?));
        }
        if let Some(instance) = &args.instance {
            config.instance = instance.trim().to_owned();
        }
        let given = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        config.tls = match (given(&args.tls_cert), given(&args.tls_key)) {
            (Some(cert), Some(key)) => Some(Arc::new(
                servicekit::tls::server_config(&cert, &key)
                    .map_err(|e| ConfigError::Invalid(format!("TLS certificate or key: {e}")))?,
            )),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "SCHEDULER_TLS_CERT (--tls-cert) and SCHEDULER_TLS_KEY (--tls-key) go together: set both or neither".into(),
                ));
            }
        };
        if !matches!(args.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log format {:?}: use text or json",
                args.log_format
            )));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would make the service misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        auth::validate(&self.api_keys).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.idempotency_ttl.is_zero() {
            return Err(ConfigError::Invalid(
                "the idempotency key retention must be positive".into(),
            ));
        }
        if self.heartbeat < Duration::from_millis(10) || self.missed_heartbeats == 0 {
            return Err(ConfigError::Invalid(
                "heartbeat period must be at least 10 ms and missed heartbeats at least 1".into(),
            ));
        }
        if self.dispatch_timeout.is_zero() || self.sweep.is_zero() {
            return Err(ConfigError::Invalid(
                "dispatch timeout and sweep period must be positive".into(),
            ));
        }
        // Refreshes go out every third of the TTL and each needs a round trip; below this
        // a loaded machine would lose the lease to its own latency.
        if self.lease_ttl < MIN_LEASE_TTL {
            return Err(ConfigError::Invalid(format!(
                "lease ttl must be at least {} ms",
                MIN_LEASE_TTL.as_millis()
            )));
        }
        if !(1..=5).contains(&self.lease_replicas) {
            return Err(ConfigError::Invalid(
                "lease replicas must be 1 to 5 (NATS stream replicas)".into(),
            ));
        }
        if self.instance.is_empty() {
            return Err(ConfigError::Invalid("instance name is empty".into()));
        }
        if self.max_artifact_bytes == 0
            || self.max_artifact_bytes > messages::fleet::MAX_ARTIFACT_BYTES
        {
            return Err(ConfigError::Invalid(format!(
                "the artifact size limit must be 1 to {} bytes",
                messages::fleet::MAX_ARTIFACT_BYTES
            )));
        }
        if self.db_path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("database path is empty".into()));
        }
        let command_ttl_ms = u64::try_from(self.command_ttl.as_millis()).unwrap_or(u64::MAX);
        if self.command_ttl < Duration::from_secs(5)
            || command_ttl_ms > messages::command::MAX_LIFETIME_MS
        {
            return Err(ConfigError::Invalid(format!(
                "command ttl must be between 5 s and {} s",
                messages::command::MAX_LIFETIME_MS / 1000
            )));
        }
        if let Some(tokens) = &self.agent_tokens
            && tokens.ttl < Duration::from_secs(2)
        {
            return Err(ConfigError::Invalid(
                "agent token ttl must be at least 2 s".into(),
            ));
        }
        Ok(())
    }

    /// How long an agent may stay silent before it is offline.
    pub fn offline_after(&self) -> Duration {
        self.heartbeat.saturating_mul(self.missed_heartbeats)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A command key file for the lifetime of the test process.
    fn key_file() -> String {
        static FILE: std::sync::OnceLock<tempfile::NamedTempFile> = std::sync::OnceLock::new();
        let file = FILE.get_or_init(|| {
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), CommandSigner::generate().to_pem().unwrap()).unwrap();
            f
        });
        file.path().display().to_string()
    }

    fn args(keys: &str) -> Args {
        Args::parse_from([
            "scheduler",
            "--api-keys",
            keys,
            "--command-key-file",
            &key_file(),
        ])
    }

    #[test]
    fn the_command_key_is_required_and_checked() {
        let none = Args::parse_from(["scheduler", "--api-keys", "0123456789abcdef"]);
        let err = Config::from_args(&none).unwrap_err().to_string();
        assert!(err.contains("SCHEDULER_COMMAND_KEY_FILE"), "{err}");
        let bad = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(bad.path(), "not a key").unwrap();
        let path = bad.path().display().to_string();
        let args = Args::parse_from([
            "scheduler",
            "--api-keys",
            "0123456789abcdef",
            "--command-key-file",
            &path,
        ]);
        assert!(Config::from_args(&args).is_err());
    }

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::from_args(&args("0123456789abcdef")).unwrap();
        assert_eq!(c.heartbeat, Duration::from_secs(10));
        assert_eq!(c.offline_after(), Duration::from_secs(30));
        assert_eq!(c.lease_ttl, Duration::from_secs(15));
        assert!(!c.instance.is_empty());
    }

    #[test]
    fn short_or_missing_keys_are_refused() {
        assert!(Config::from_args(&args("short")).is_err());
        assert!(Config::from_args(&args(" , ")).is_err());
    }

    #[test]
    fn named_keys_and_the_idempotency_retention_are_read() {
        let c = Config::from_args(&Args::parse_from([
            "scheduler",
            "--api-keys",
            "ops:operator:0123456789abcdef,dash:read:fedcba9876543210",
            "--idempotency-ttl-secs",
            "60",
            "--command-key-file",
            &key_file(),
        ]))
        .unwrap();
        assert_eq!(
            c.api_keys,
            vec![
                ApiKey::operator("ops", "0123456789abcdef"),
                ApiKey::read("dash", "fedcba9876543210")
            ]
        );
        assert_eq!(c.idempotency_ttl, Duration::from_secs(60));
        let err = Config::from_args(&args("ops:admin:0123456789abcdef")).unwrap_err();
        assert!(err.to_string().contains("unknown scope"), "{err}");
    }

    #[test]
    fn lease_settings_are_read_and_checked() {
        let ok = Args::parse_from([
            "scheduler",
            "--api-keys",
            "0123456789abcdef",
            "--instance",
            "sched-a",
            "--lease-ttl-ms",
            "2000",
            "--command-key-file",
            &key_file(),
        ]);
        let c = Config::from_args(&ok).unwrap();
        assert_eq!(
            (c.instance.as_str(), c.lease_ttl),
            ("sched-a", Duration::from_secs(2))
        );
        let short = Args::parse_from([
            "scheduler",
            "--api-keys",
            "0123456789abcdef",
            "--lease-ttl-ms",
            "10",
            "--command-key-file",
            &key_file(),
        ]);
        assert!(Config::from_args(&short).is_err());
        let replicated = |n: &str| {
            Config::from_args(&Args::parse_from([
                "scheduler",
                "--api-keys",
                "0123456789abcdef",
                "--lease-replicas",
                n,
                "--command-key-file",
                &key_file(),
            ]))
        };
        assert_eq!(replicated("3").unwrap().lease_replicas, 3);
        assert!(replicated("0").is_err());
        assert!(replicated("7").is_err());
    }

    #[test]
    fn tls_needs_both_files_and_readable_ones() {
        let half = Args::parse_from([
            "scheduler",
            "--api-keys",
            "0123456789abcdef",
            "--command-key-file",
            &key_file(),
            "--tls-cert",
            "cert.pem",
        ]);
        let e = Config::from_args(&half).unwrap_err().to_string();
        assert!(e.contains("SCHEDULER_TLS_KEY"), "{e}");
        let missing = Args::parse_from([
            "scheduler",
            "--api-keys",
            "0123456789abcdef",
            "--command-key-file",
            &key_file(),
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ]);
        let e = Config::from_args(&missing).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
        assert!(
            Config::from_args(&args("0123456789abcdef"))
                .unwrap()
                .tls
                .is_none()
        );
    }
}
