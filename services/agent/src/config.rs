//! Agent configuration: a TOML file plus `AGENT_*` environment overrides.
//!
//! This module owns the file format, the environment variable names, the precedence
//! (environment over file over defaults) and all validation, so that the rest of the agent
//! receives an [`AgentConfig`] that is known to be usable. Every error names the field and
//! where its value came from (the file, with a line for syntax and type errors, or the
//! environment variable), because an agent on a remote machine that refuses to start must
//! say exactly what to fix.
//!
//! The environment is passed in as a lookup function rather than read here, so tests and
//! callers never mutate the process environment (which is racy under a parallel test
//! runner).
//!
//! ```toml
//! node_id = "edge-berlin-17"
//! token_file = "token"                  # or: token = "..."
//! gateways = ["ws://gw1.example:8081/ws", "ws://gw2.example:8081/ws"]
//! outbox_path = "/var/lib/agent/outbox.redb"
//! report_period_secs = 30               # default 30
//! heartbeat_secs = 10                   # optional: overrides the gateway's interval
//! resend_after_ms = 15000               # default 15000: outbox entries unacknowledged this
//!                                       # long are sent again on the same connection
//! allowed_commands = ["/usr/bin/uptime", "df"]   # default: none
//! metrics_listen = "127.0.0.1:9464"     # optional: serve Prometheus /metrics here
//! relay_listen = "10.0.0.5:7000"        # optional: be a relay for downstream agents
//!                                       # (ADR 0015); they point a gateway URL at it;
//!                                       # or "unix:/run/edge/relay.sock" (a 0660 file)
//! insecure_relay = false                # allow via= over ws:// (test setups only)
//! command_keys_file = "command.pub"     # required to run: the control plane's public
//!                                       # command key(s), PEM; unsigned commands are refused
//! credential_path = "credential.jwt"    # default: credential.jwt beside the outbox
//! config_dir = "/etc/app"               # optional: where pushed config documents are
//!                                       # written (none: every config push fails)
//! config_state_path = "configs.json"    # default: configs.json beside the outbox
//! scheduler_url = "https://sched:8080"  # optional: where signed upgrades are downloaded
//!                                       # from (none: every upgrade fails, naming this)
//!
//! # What tasks may do (see the policy module); the values shown are the defaults.
//! command_search_path = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
//! allowed_env = []                      # names a task's env may set
//! allowed_cwd_roots = []                # a task's cwd must lie under one of these
//! max_concurrent_tasks = 16
//! max_timeout_ms = 3600000              # 1 hour
//! probe_allow = []                      # CIDRs, e.g. ["169.254.169.254/32"]
//! probe_deny = []                       # CIDRs, e.g. ["10.0.0.0/8"]
//! tls_ca_file = "ca.pem"                # optional: CAs trusted for wss:// gateways
//! tls_pin_sha256 = ["sha256/AbC...="]   # optional: pins of the gateways' public keys
//!
//! # TCP tunnels (docs/protocol.md 12.12); the values shown are the defaults.
//! tunnel_allow = []                     # exact host:port the agent may dial for a tunnel,
//!                                       # e.g. ["127.0.0.1:22"]; empty: tunnels refused
//! tunnel_max_streams = 16               # streams open at once; more are refused
//! tunnel_frames_per_sec = 40            # tunnel frames sent upward per second, kept below
//!                                       # the gateway's per-connection frame rate
//!
//! [labels]
//! region = "eu-central"
//!
//! [backoff]                             # defaults: 100 ms, 30 s, 0.3
//! base_ms = 100
//! cap_ms = 30000
//! jitter = 0.3
//! ```
//!
//! Environment variables (each replaces the file's value; lists are comma-separated, labels
//! are `key=value,key=value`): `AGENT_NODE_ID`, `AGENT_TOKEN`, `AGENT_TOKEN_FILE`,
//! `AGENT_GATEWAYS`, `AGENT_LABELS`, `AGENT_OUTBOX_PATH`, `AGENT_HEARTBEAT_SECS`,
//! `AGENT_REPORT_PERIOD_SECS`, `AGENT_BACKOFF_BASE_MS`, `AGENT_BACKOFF_CAP_MS`,
//! `AGENT_BACKOFF_JITTER`, `AGENT_ALLOWED_COMMANDS`, `AGENT_METRICS_LISTEN`,
//! `AGENT_COMMAND_KEYS_FILE`, `AGENT_CREDENTIAL_PATH`, `AGENT_CONFIG_DIR`,
//! `AGENT_CONFIG_STATE_PATH`, `AGENT_SCHEDULER_URL`, `AGENT_REPORTED_VERSION`,
//! `AGENT_COMMAND_SEARCH_PATH` (separated by `,` or `:`), `AGENT_ALLOWED_ENV`,
//! `AGENT_ALLOWED_CWD_ROOTS`, `AGENT_MAX_CONCURRENT_TASKS`, `AGENT_MAX_TIMEOUT_MS`,
//! `AGENT_PROBE_ALLOW`, `AGENT_PROBE_DENY`, `AGENT_TLS_CA_FILE`, `AGENT_TLS_PIN_SHA256`,
//! `AGENT_RELAY_LISTEN`, `AGENT_INSECURE_RELAY`.
//!
//! Relays (ADR 0015): a gateway URL may end in `?via=host:port`, or `?via=unix:/abs/path`
//! for a relay's socket file on this machine (the value is percent-decoded first; the path
//! must be absolute, written with one slash after `unix:`, at most 107 bytes; a URL has at
//! most one `via=`). The agent then opens its connection to that relay, and everything
//! above it (TLS with the URL's host name, the upgrade with its own token, the session) is
//! end to end with the gateway, so list a relay and the gateway directly (or two relays)
//! to fail over. `relay_listen` makes this agent a relay: it accepts such connections on
//! an `IP:port` or a `unix:/abs/path` socket file and carries them over one connection to
//! its own gateways, which must not use `via=` themselves (relays nest one level). The
//! socket file gets mode 0660, so the agent's user and group decide who may be a
//! downstream; a stale file (nothing listening) is replaced, a live one refused, and the
//! file is removed when the agent stops (see [`crate::relay`]). The agent runs on Unix
//! (Linux) only, so the unix form needs no platform gate.
//! Over `ws://` a relay would see this agent's token and could alter its traffic, so a
//! `via=` on a `ws://` URL is refused unless `insecure_relay = true`
//! (`AGENT_INSECURE_RELAY=1`), meant for test setups on one machine.
//!
//! `token`/`token_file` is the enrolment credential (an agent token the operator got from
//! the scheduler). Once connected, the control plane renews the credential over the live
//! connection; the agent keeps the newest at `credential_path` and connects with whichever
//! valid token expires last (the token file is re-read at every connect, so an operator can
//! drop in a new one without a restart).
//!
//! The execution policy ([`crate::policy`] explains each rule): a bare name on
//! `allowed_commands` runs the first executable of that name on `command_search_path`
//! (absolute directories; never the agent's or the task's `PATH`), which is also the only
//! `PATH` a command sees. Commands start from an empty environment (plus `PATH` and
//! `LANG=C.UTF-8`); a task may set only variables named on `allowed_env`, and loader or
//! shell variables (`LD_*`, `DYLD_*`, `PATH`, `IFS`, `BASH_ENV`, ...) are rejected here
//! even if listed. With `allowed_cwd_roots` empty a task may not choose its directory (it
//! runs in `/`). Beyond `max_concurrent_tasks` running tasks, and above `max_timeout_ms`,
//! tasks are refused. Probes never reach link-local or cloud metadata addresses
//! (169.254.0.0/16, fe80::/10, fd00:ec2::254, 100.100.100.200) unless `probe_allow` names
//! them; `probe_deny` adds ranges; the most specific range decides.
//!
//! `metrics_listen` is an `IP:port` socket address (`127.0.0.1:9464`, `[::1]:9464`,
//! `0.0.0.0:9464`; host names are not resolved). When set, the agent serves Prometheus
//! OpenMetrics text on `GET /metrics` and `"ok"` on `GET /healthz` there (see
//! `servicekit::metrics_server`); when unset (the default) it opens no listening socket. The
//! endpoint has no authentication, so prefer a loopback or private address. Port 0 binds a
//! free port (see [`crate::AgentHandle::metrics_addr`]); an empty value turns the endpoint
//! off, so `AGENT_METRICS_LISTEN=` can disable a file's setting.
//!
//! TLS (`wss://` gateways; rustls, no OpenSSL): `tls_ca_file` is a PEM bundle of the CAs
//! trusted to sign gateway certificates. When it is unset, the system's trust store is used
//! (`/etc/ssl/certs` via the `ca-certificates` package, honouring `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`), so a gateway with a public certificate needs no setting while a private
//! CA is one file, managed like the token; the store is read at start and an empty one is
//! a configuration error when a `wss://` gateway is configured. `tls_pin_sha256` adds a
//! check on top of normal chain, validity and name validation: the gateway's public key
//! (the SHA-256 of its DER SubjectPublicKeyInfo, 64 hex digits or base64, optionally
//! prefixed `sha256/`) must be one of the pins; list the current and the next key while
//! rotating. Compute a pin with `openssl x509 -in cert.pem -pubkey -noout | openssl pkey
//! -pubin -outform der | openssl dgst -sha256 -binary | base64`. A missing or unparsable
//! CA file, a bad pin, or pins with no `wss://` gateway (nothing would be checked) stop the
//! agent at start; a handshake that fails (unknown CA, wrong name, pin mismatch) is logged
//! with its cause and retried with backoff like any other connection failure.
//!
//! Config documents (`crate::configs`): the control plane pushes signed, versioned files,
//! written only as plain files directly inside `config_dir` (the document name is a file
//! name, never a path); their validate and reload commands must be on `allowed_commands`
//! like any task's. What was applied is remembered in `config_state_path`, so a restarted
//! agent reports it truthfully at its next register.
//!
//! Relative paths in the file (`token_file`, `outbox_path`, `command_keys_file`,
//! `credential_path`, `config_dir`, `config_state_path`, `tls_ca_file`) are resolved against the file's
//! directory, so the agent does not depend on the directory it was started from; relative
//! paths from the environment are used as given.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use messages::command::CommandVerifier;
use messages::{IdError, UserId};
use serde::Deserialize;
use servicekit::tls::{ClientConfig, SpkiPin};

use crate::backoff::{BackoffError, ExponentialBackoff};
use crate::policy::{self, Cidr, CidrError, ExecPolicy};

/// Default period between status reports.
pub(crate) const DEFAULT_REPORT_PERIOD_SECS: u64 = 30;

/// Longest label key or value.
pub(crate) const MAX_LABEL_LEN: usize = 128;

/// The agent's credential. Its `Debug` output is redacted so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a token's text.
    pub fn new(text: String) -> Self {
        Token(text)
    }

    /// The secret text, for the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// TLS settings for `wss://` gateways, loaded and checked when the configuration is.
#[derive(Clone, Default)]
pub struct TlsSettings {
    /// The PEM bundle of trusted CAs, if configured; otherwise the system's store is used.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 pins of acceptable gateway public keys; empty means no pinning.
    pub pins: Vec<SpkiPin>,
    client: Option<Arc<ClientConfig>>,
}

impl TlsSettings {
    /// The rustls client configuration for `wss://` gateways (trust anchors and pins
    /// loaded); `None` when no gateway uses `wss://`.
    pub fn client_config(&self) -> Option<&Arc<ClientConfig>> {
        self.client.as_ref()
    }
}

/// Equal when configured the same; the loaded trust anchors follow from the settings.
impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.pins == other.pins
            && self.client.is_some() == other.client.is_some()
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_file", &self.ca_file)
            .field("pins", &self.pins)
            .field("loaded", &self.client.is_some())
            .finish()
    }
}

/// Validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// This node's id; also its user id on the gateway.
    pub node_id: UserId,
    /// The credential sent when connecting.
    pub token: Token,
    /// Where the token was read from, if it came from a file (so it can be re-read when
    /// rotated).
    pub token_file: Option<PathBuf>,
    /// Gateway WebSocket URLs (`ws://` or `wss://`), at least one.
    pub gateways: Vec<String>,
    /// Labels reported at registration, used by the scheduler's selectors.
    pub labels: BTreeMap<String, String>,
    /// The outbox's redb file.
    pub outbox_path: PathBuf,
    /// Fixed heartbeat interval overriding the one the gateway announces, if set.
    pub heartbeat: Option<Duration>,
    /// Outbox entries unacknowledged this long are sent again without a reconnect.
    pub resend_after: Duration,
    /// Period between status reports.
    pub report_period: Duration,
    /// Reconnect backoff.
    pub backoff: ExponentialBackoff,
    /// Programs a command task may run: bare names (matching a bare `argv[0]`, looked up on
    /// `command_search_path`) or absolute paths (matching that `argv[0]` exactly). Empty
    /// means no command may run.
    pub allowed_commands: Vec<String>,
    /// Where to serve the Prometheus `/metrics` endpoint; `None` (the default) serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// Relay mode (ADR 0015): accept downstream agents' connections here and carry them
    /// over one upstream connection to the gateways; `None` (the default): not a relay.
    pub relay_listen: Option<RelayListen>,
    /// Accept `via=` relays on `ws://` gateway URLs (the relay can then read the token and
    /// alter traffic); `false` (the default) refuses such a configuration.
    pub insecure_relay: bool,
    /// Public keys of the control plane's command key (several during a rotation):
    /// the agent acts only on commands signed by one of them. `None` when not configured;
    /// the agent then refuses to start.
    pub command_keys: Option<CommandVerifier>,
    /// Where the newest credential the control plane issued is kept (written atomically),
    /// so a restart reconnects with it rather than with an expired enrolment token.
    pub credential_path: PathBuf,
    /// Where pushed config documents are written; `None`: config pushes fail (acked as
    /// failed, naming this setting).
    pub config_dir: Option<PathBuf>,
    /// Where the versions of applied config documents are remembered (written
    /// atomically), so a restart reports them truthfully.
    pub config_state_path: PathBuf,
    /// Absolute directories searched, in order, for bare program names; also the only
    /// `PATH` a command sees.
    pub command_search_path: Vec<PathBuf>,
    /// Environment variable names a task may set (never loader or shell ones).
    pub allowed_env: Vec<String>,
    /// Directories a task's `cwd` must resolve under; empty means a task may not set one.
    pub allowed_cwd_roots: Vec<PathBuf>,
    /// Most tasks running at once; more are refused.
    pub max_concurrent_tasks: usize,
    /// Longest timeout a task may ask for; longer ones are refused.
    pub max_timeout: Duration,
    /// Probe destinations allowed even though the built-in list denies them.
    pub probe_allow: Vec<Cidr>,
    /// Probe destinations denied.
    pub probe_deny: Vec<Cidr>,
    /// TLS settings for `wss://` gateways.
    pub tls: TlsSettings,
    /// Base URL of the scheduler's HTTP API (`http://` or `https://`), where signed
    /// upgrades are downloaded from with this node's credential. Configured here rather
    /// than taken from the command, so the credential only ever goes where the operator of
    /// this machine said. `None`: every upgrade fails, naming this setting.
    pub scheduler_url: Option<String>,
    /// Where an upgrade in progress is recorded ([`crate::upgrade`]): `upgrade.json`
    /// beside the outbox.
    pub upgrade_state_path: PathBuf,
    /// The version reported at register: the build's, unless `AGENT_REPORTED_VERSION`
    /// (environment only) overrides it, for packagers who append a build suffix. It is the
    /// agent's claim about itself like every register field, and gates nothing.
    pub reported_version: String,
    /// Set (`AGENT_UPGRADE_PROBE=1`, environment only) when this process is a new binary
    /// being tried out by [`crate::upgrade`]: it marks the upgrade record once registered.
    pub upgrade_probe: bool,
    /// Exact `host:port` addresses a tunnel may dial; empty (the default) refuses every
    /// tunnel.
    pub tunnel_allow: Vec<String>,
    /// Most tunnel streams open at once.
    pub tunnel_max_streams: usize,
    /// Tunnel frames sent upward per second at most: the gateway drops frames above its
    /// per-connection rate and closes connections that keep exceeding it, so the agent
    /// paces its tunnel traffic below that rate, leaving room for heartbeats and reports.
    pub tunnel_frames_per_sec: u32,
    /// The file this was loaded from, if any.
    pub file: Option<PathBuf>,
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(&'static str),
    /// The built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "in {}", p.display()),
            Origin::Env(var) => write!(f, "from {var}"),
            Origin::Default => f.write_str("by default"),
        }
    }
}

/// Default [`AgentConfig::tunnel_max_streams`].
pub(crate) const DEFAULT_TUNNEL_MAX_STREAMS: usize = 16;
/// Default [`AgentConfig::tunnel_frames_per_sec`]: below the gateway's default 50 frames
/// per second per connection.
pub(crate) const DEFAULT_TUNNEL_FRAMES_PER_SEC: u32 = 40;

/// A tunnel allowlist entry is `host:port` with a non-empty host and a port from 1.
fn check_tunnel_address(entry: &str) -> Result<(), Problem> {
    let ok = entry.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.chars().any(char::is_whitespace)
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if ok {
        Ok(())
    } else {
        Err(Problem::TunnelAddress(entry.to_owned()))
    }
}

/// What is wrong with a configuration value.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Not a valid node id.
    #[error("not a valid node id: {0}")]
    NodeId(IdError),
    /// The command keys file is unreadable or holds no Ed25519 public key.
    #[error("command keys: {0}")]
    CommandKeys(String),
    /// A tunnel allowlist entry is not `host:port`.
    #[error("tunnel address {0:?} must be host:port")]
    TunnelAddress(String),
    /// Both `token` and `token_file` are set.
    #[error("both token and token_file are set; use one")]
    TokenAndTokenFile,
    /// The token is empty (after trimming surrounding whitespace).
    #[error("the token is empty")]
    EmptyToken,
    /// The token contains whitespace or control characters.
    #[error("the token contains whitespace or control characters")]
    TokenCharacters,
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The gateway list is empty.
    #[error("at least one gateway URL is required")]
    NoGateways,
    /// A gateway URL does not start with `ws://` or `wss://`.
    #[error("gateway URL {url:?} must start with ws:// or wss://")]
    GatewayScheme {
        /// The offending URL.
        url: String,
    },
    /// A gateway URL is malformed.
    #[error("gateway URL {url:?}: {reason}")]
    GatewayUrl {
        /// The offending URL.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a boolean.
    #[error("{value:?} is not a boolean (true, false, 1 or 0)")]
    NotABool {
        /// The value given.
        value: String,
    },
    /// Not a non-negative integer.
    #[error("{value:?} is not a non-negative integer")]
    NotAnInteger {
        /// The text given.
        value: String,
    },
    /// Not a number.
    #[error("{value:?} is not a number")]
    NotANumber {
        /// The text given.
        value: String,
    },
    /// Zero where a positive number is required.
    #[error("must be greater than zero")]
    Zero,
    /// Below the smallest value accepted.
    #[error("must be at least {0}")]
    TooSmall(u64),
    /// Invalid backoff settings.
    #[error("{0}")]
    Backoff(BackoffError),
    /// `scheduler_url` is not an `http://` or `https://` URL.
    #[error("scheduler URL {url:?} must start with http:// or https://")]
    SchedulerUrl {
        /// The offending URL.
        url: String,
    },
    /// An empty path.
    #[error("the path is empty")]
    EmptyPath,
    /// An invalid label.
    #[error("label {label:?}: {reason}")]
    Label {
        /// The offending key (or `key=value` entry from the environment).
        label: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a relay listen address.
    #[error("{value:?}: {reason} (expected IP:port, e.g. 10.0.0.5:7000, or unix:/absolute/path)")]
    RelayListen {
        /// The text given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not an `IP:port` socket address.
    #[error("{value:?} is not a socket address (expected IP:port, e.g. 127.0.0.1:9464)")]
    NotASocketAddr {
        /// The text given.
        value: String,
    },
    /// The CA file cannot be used.
    #[error("{0}")]
    Tls(servicekit::tls::TlsError),
    /// Not a SHA-256 pin.
    #[error("{0}")]
    Pin(servicekit::tls::PinParseError),
    /// Pins are set but no gateway uses `wss://`, so nothing would be checked.
    #[error("pins are set but no gateway URL uses wss://")]
    PinsWithoutTls,
    /// An invalid allowed-command entry.
    #[error("allowed command {entry:?}: {reason}")]
    Command {
        /// The offending entry.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An invalid search path directory or cwd root.
    #[error("directory {entry:?}: {reason}")]
    Directory {
        /// The offending entry.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The command search path is empty.
    #[error("at least one directory is required")]
    EmptySearchPath,
    /// An invalid or forbidden environment variable name.
    #[error("environment variable {name:?}: {reason}")]
    EnvName {
        /// The offending name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a CIDR range.
    #[error("{0}")]
    Cidr(CidrError),
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {}: cannot read: {source}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type. The
    /// message (from the toml crate) shows the line and column.
    #[error("config {}: {source}", path.display())]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// 1-based line of the error, when known.
        line: Option<usize>,
        /// 1-based column of the error, when known.
        column: Option<usize>,
        /// The toml crate's error.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A required field is set neither in the file nor in the environment.
    #[error("config: {field} is missing: set {field} in {} or {env}", file.as_deref().map_or_else(|| "the config file".to_owned(), |p| p.display().to_string()))]
    Missing {
        /// The field, as spelled in the file.
        field: &'static str,
        /// The environment variable that can set it.
        env: &'static str,
        /// The configuration file, if one was given.
        file: Option<PathBuf>,
    },
    /// A field has an invalid value.
    #[error("config: {field} {origin}: {problem}")]
    Invalid {
        /// The field, as spelled in the file (`backoff.jitter` for nested ones).
        field: &'static str,
        /// Where the value came from.
        origin: Origin,
        /// What is wrong.
        problem: Problem,
    },
}

impl ConfigError {
    /// The field the error is about, if it is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ConfigError::Missing { field, .. } | ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Read { .. } | ConfigError::Parse { .. } => None,
        }
    }
}

/// The file's shape. Unknown keys are errors so a typo (`gateway = ...`) is reported, with
/// its line, instead of being silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    gateways: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    outbox_path: Option<PathBuf>,
    heartbeat_secs: Option<u64>,
    resend_after_ms: Option<u64>,
    report_period_secs: Option<u64>,
    backoff: Option<FileBackoff>,
    allowed_commands: Option<Vec<String>>,
    metrics_listen: Option<String>,
    relay_listen: Option<String>,
    insecure_relay: Option<bool>,
    command_keys_file: Option<PathBuf>,
    credential_path: Option<PathBuf>,
    config_dir: Option<PathBuf>,
    config_state_path: Option<PathBuf>,
    command_search_path: Option<Vec<String>>,
    allowed_env: Option<Vec<String>>,
    allowed_cwd_roots: Option<Vec<String>>,
    max_concurrent_tasks: Option<u64>,
    max_timeout_ms: Option<u64>,
    probe_allow: Option<Vec<String>>,
    probe_deny: Option<Vec<String>>,
    scheduler_url: Option<String>,
    tls_ca_file: Option<PathBuf>,
    tls_pin_sha256: Option<Vec<String>>,
    tunnel_allow: Option<Vec<String>>,
    tunnel_max_streams: Option<u64>,
    tunnel_frames_per_sec: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackoff {
    base_ms: Option<u64>,
    cap_ms: Option<u64>,
    jitter: Option<f64>,
}

/// A value and where it came from.
struct Sourced<T> {
    value: T,
    origin: Origin,
}

/// Resolves one field: the environment variable wins over the file.
struct Layers<'a, E> {
    env: &'a E,
    file: Option<&'a Path>,
}

impl<E: Fn(&str) -> Option<String>> Layers<'_, E> {
    fn file_origin(&self) -> Origin {
        self.file
            .map_or(Origin::Default, |p| Origin::File(p.to_path_buf()))
    }

    /// The environment's value for `var` (parsed by `parse`) or else the file's.
    fn pick<T>(
        &self,
        field: &'static str,
        var: &'static str,
        from_file: Option<T>,
        parse: impl FnOnce(&str) -> Result<T, Problem>,
    ) -> Result<Option<Sourced<T>>, ConfigError> {
        if let Some(raw) = (self.env)(var) {
            let origin = Origin::Env(var);
            return match parse(raw.trim()) {
                Ok(value) => Ok(Some(Sourced { value, origin })),
                Err(problem) => Err(ConfigError::Invalid {
                    field,
                    origin,
                    problem,
                }),
            };
        }
        Ok(from_file.map(|value| Sourced {
            value,
            origin: self.file_origin(),
        }))
    }

    fn missing(&self, field: &'static str, env: &'static str) -> ConfigError {
        ConfigError::Missing {
            field,
            env,
            file: self.file.map(Path::to_path_buf),
        }
    }

    /// Resolves a path from the file against the file's directory.
    fn resolve(&self, path: PathBuf, origin: &Origin) -> PathBuf {
        match (origin, self.file.and_then(Path::parent)) {
            (Origin::File(_), Some(dir)) if path.is_relative() => dir.join(path),
            _ => path,
        }
    }
}

fn invalid(field: &'static str, origin: Origin, problem: Problem) -> ConfigError {
    ConfigError::Invalid {
        field,
        origin,
        problem,
    }
}

fn parse_u64(s: &str) -> Result<u64, Problem> {
    s.parse().map_err(|_| Problem::NotAnInteger {
        value: s.to_owned(),
    })
}

fn parse_bool(s: &str) -> Result<bool, Problem> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" | "" => Ok(false),
        _ => Err(Problem::NotABool {
            value: s.to_owned(),
        }),
    }
}

fn parse_f64(s: &str) -> Result<f64, Problem> {
    s.parse().map_err(|_| Problem::NotANumber {
        value: s.to_owned(),
    })
}

fn parse_list(s: &str) -> Result<Vec<String>, Problem> {
    Ok(s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect())
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, Problem> {
    let mut labels = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(Problem::Label {
                label: item.to_owned(),
                reason: "expected key=value",
            });
        };
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

/// A `PATH`-like list: `:` is accepted as a separator besides `,`.
fn parse_search_path(s: &str) -> Result<Vec<String>, Problem> {
    parse_list(&s.replace(':', ","))
}

fn parse_path(s: &str) -> Result<PathBuf, Problem> {
    Ok(PathBuf::from(s))
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, Problem> {
    s.trim().parse().map_err(|_| Problem::NotASocketAddr {
        value: s.to_owned(),
    })
}

impl AgentConfig {
    /// Loads the configuration from the TOML file at `path` (if given) with overrides from
    /// `env` (a lookup such as `|k| std::env::var(k).ok()`), and validates it.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => None,
        };
        let file_config = match (path, text.as_deref()) {
            (Some(p), Some(text)) => parse_file(p, text)?,
            _ => FileConfig::default(),
        };
        Self::build(file_config, path, &env)
    }

    /// Like [`AgentConfig::load`], with the file's text given directly; `path` is used for
    /// error messages and to resolve relative paths.
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let file_config = parse_file(path, text)?;
        Self::build(file_config, Some(path), &env)
    }

    fn build<E: Fn(&str) -> Option<String>>(
        f: FileConfig,
        path: Option<&Path>,
        env: &E,
    ) -> Result<AgentConfig, ConfigError> {
        let l = Layers { env, file: path };

        let node_id = l
            .pick("node_id", "AGENT_NODE_ID", f.node_id, |s| Ok(s.to_owned()))?
            .ok_or_else(|| l.missing("node_id", "AGENT_NODE_ID"))?;
        let node_id_value = UserId::new(node_id.value)
            .map_err(|e| invalid("node_id", node_id.origin, Problem::NodeId(e)))?;

        let (token, token_file) = resolve_token(&l, f.token, f.token_file)?;

        let gateways = l
            .pick("gateways", "AGENT_GATEWAYS", f.gateways, parse_list)?
            .ok_or_else(|| l.missing("gateways", "AGENT_GATEWAYS"))?;
        if gateways.value.is_empty() {
            return Err(invalid("gateways", gateways.origin, Problem::NoGateways));
        }
        for url in &gateways.value {
            check_gateway_url(url).map_err(|p| invalid("gateways", gateways.origin.clone(), p))?;
        }

        let labels = l.pick("labels", "AGENT_LABELS", f.labels, parse_labels)?;
        let labels = match labels {
            Some(Sourced { value, origin }) => {
                for (k, v) in &value {
                    check_label(k, v).map_err(|p| invalid("labels", origin.clone(), p))?;
                }
                value
            }
            None => BTreeMap::new(),
        };

        let outbox = l
            .pick(
                "outbox_path",
                "AGENT_OUTBOX_PATH",
                f.outbox_path,
                parse_path,
            )?
            .ok_or_else(|| l.missing("outbox_path", "AGENT_OUTBOX_PATH"))?;
        if outbox.value.as_os_str().is_empty() {
            return Err(invalid("outbox_path", outbox.origin, Problem::EmptyPath));
        }
        let outbox_path = l.resolve(outbox.value, &outbox.origin);

        let heartbeat = match l.pick(
            "heartbeat_secs",
            "AGENT_HEARTBEAT_SECS",
            f.heartbeat_secs,
            parse_u64,
        )? {
            Some(h) => Some(positive_secs("heartbeat_secs", h)?),
            None => None,
        };

        let resend_after = match l.pick(
            "resend_after_ms",
            "AGENT_RESEND_AFTER_MS",
            f.resend_after_ms,
            parse_u64,
        )? {
            Some(ms) if ms.value < 100 => {
                return Err(invalid(
                    "resend_after_ms",
                    ms.origin,
                    Problem::TooSmall(100),
                ));
            }
            Some(ms) => Duration::from_millis(ms.value),
            None => DEFAULT_RESEND_AFTER,
        };

        let report_period = match l.pick(
            "report_period_secs",
            "AGENT_REPORT_PERIOD_SECS",
            f.report_period_secs,
            parse_u64,
        )? {
            Some(p) => positive_secs("report_period_secs", p)?,
            None => Duration::from_secs(DEFAULT_REPORT_PERIOD_SECS),
        };

        let backoff = resolve_backoff(&l, f.backoff.unwrap_or_default())?;

        let allowed_commands = match l.pick(
            "allowed_commands",
            "AGENT_ALLOWED_COMMANDS",
            f.allowed_commands,
            parse_list,
        )? {
            Some(Sourced { value, origin }) => {
                for entry in &value {
                    check_command(entry)
                        .map_err(|p| invalid("allowed_commands", origin.clone(), p))?;
                }
                value
            }
            None => Vec::new(),
        };

        // The file's value is text (not a typed TOML field) so a bad address is reported
        // like any other invalid value, naming the field and where it came from.
        let metrics_listen = match l.pick(
            "metrics_listen",
            "AGENT_METRICS_LISTEN",
            f.metrics_listen,
            |s| Ok(s.to_owned()),
        )? {
            // Empty means off, so `AGENT_METRICS_LISTEN=` can disable the file's setting.
            Some(Sourced { value, .. }) if value.trim().is_empty() => None,
            Some(Sourced { value, origin }) => {
                Some(parse_socket_addr(&value).map_err(|p| invalid("metrics_listen", origin, p))?)
            }
            None => None,
        };

        let relay_listen =
            match l.pick("relay_listen", "AGENT_RELAY_LISTEN", f.relay_listen, |s| {
                Ok(s.to_owned())
            })? {
                Some(Sourced { value, .. }) if value.trim().is_empty() => None,
                Some(Sourced { value, origin }) => Some(
                    RelayListen::parse(&value).map_err(|p| invalid("relay_listen", origin, p))?,
                ),
                None => None,
            };
        let insecure_relay = l
            .pick(
                "insecure_relay",
                "AGENT_INSECURE_RELAY",
                f.insecure_relay,
                parse_bool,
            )?
            .is_some_and(|s| s.value);
        // Over ws:// a relay reads the token and can alter frames: end to end only with TLS.
        if !insecure_relay
            && let Some(url) = gateways
                .value
                .iter()
                .find(|u| has_via(u) && u.to_ascii_lowercase().starts_with("ws://"))
        {
            return Err(invalid(
                "gateways",
                gateways.origin.clone(),
                Problem::GatewayUrl {
                    url: url.clone(),
                    reason: "a via= relay over ws:// could read this agent's token and alter its traffic; use wss:// (or insecure_relay = true in a test setup)",
                },
            ));
        }
        // A relay's own upstream must be a gateway: relays nest one level only.
        if relay_listen.is_some()
            && let Some(url) = gateways.value.iter().find(|u| has_via(u))
        {
            return Err(invalid(
                "gateways",
                gateways.origin.clone(),
                Problem::GatewayUrl {
                    url: url.clone(),
                    reason: "a relay connects to gateways directly (no via=)",
                },
            ));
        }

        let command_keys = match l.pick(
            "command_keys_file",
            "AGENT_COMMAND_KEYS_FILE",
            f.command_keys_file,
            parse_path,
        )? {
            Some(Sourced { value, origin }) => {
                let path = l.resolve(value, &origin);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        "command_keys_file",
                        origin.clone(),
                        Problem::CommandKeys(format!("{}: {e}", path.display())),
                    )
                })?;
                Some(CommandVerifier::from_pem(&text).map_err(|e| {
                    invalid(
                        "command_keys_file",
                        origin,
                        Problem::CommandKeys(format!("{}: {e}", path.display())),
                    )
                })?)
            }
            None => None,
        };

        let credential_path = match l.pick(
            "credential_path",
            "AGENT_CREDENTIAL_PATH",
            f.credential_path,
            parse_path,
        )? {
            Some(Sourced { value, origin }) => l.resolve(value, &origin),
            None => outbox_path.with_file_name("credential.jwt"),
        };

        let config_dir = match l.pick("config_dir", "AGENT_CONFIG_DIR", f.config_dir, parse_path)? {
            // Empty means unset, so `AGENT_CONFIG_DIR=` can turn the file's setting off.
            Some(Sourced { value, .. }) if value.as_os_str().is_empty() => None,
            Some(Sourced { value, origin }) => Some(l.resolve(value, &origin)),
            None => None,
        };

        let config_state_path = match l.pick(
            "config_state_path",
            "AGENT_CONFIG_STATE_PATH",
            f.config_state_path,
            parse_path,
        )? {
            Some(Sourced { value, origin }) if value.as_os_str().is_empty() => {
                return Err(invalid("config_state_path", origin, Problem::EmptyPath));
            }
            Some(Sourced { value, origin }) => l.resolve(value, &origin),
            None => outbox_path.with_file_name("configs.json"),
        };

        let command_search_path = match l.pick(
            "command_search_path",
            "AGENT_COMMAND_SEARCH_PATH",
            f.command_search_path,
            parse_search_path,
        )? {
            Some(Sourced { value, origin }) => {
                if value.is_empty() {
                    return Err(invalid(
                        "command_search_path",
                        origin,
                        Problem::EmptySearchPath,
                    ));
                }
                for dir in &value {
                    check_directory(dir, true)
                        .map_err(|p| invalid("command_search_path", origin.clone(), p))?;
                }
                value.into_iter().map(PathBuf::from).collect()
            }
            None => policy::DEFAULT_SEARCH_PATH
                .iter()
                .map(PathBuf::from)
                .collect(),
        };

        let allowed_env = match l.pick(
            "allowed_env",
            "AGENT_ALLOWED_ENV",
            f.allowed_env,
            parse_list,
        )? {
            Some(Sourced { value, origin }) => {
                for name in &value {
                    check_env_name(name).map_err(|p| invalid("allowed_env", origin.clone(), p))?;
                }
                value
            }
            None => Vec::new(),
        };

        let allowed_cwd_roots = match l.pick(
            "allowed_cwd_roots",
            "AGENT_ALLOWED_CWD_ROOTS",
            f.allowed_cwd_roots,
            parse_list,
        )? {
            Some(Sourced { value, origin }) => {
                for dir in &value {
                    check_directory(dir, false)
                        .map_err(|p| invalid("allowed_cwd_roots", origin.clone(), p))?;
                }
                value.into_iter().map(PathBuf::from).collect()
            }
            None => Vec::new(),
        };

        let max_concurrent_tasks = match l.pick(
            "max_concurrent_tasks",
            "AGENT_MAX_CONCURRENT_TASKS",
            f.max_concurrent_tasks,
            parse_u64,
        )? {
            Some(Sourced { value: 0, origin }) => {
                return Err(invalid("max_concurrent_tasks", origin, Problem::Zero));
            }
            Some(Sourced { value, .. }) => usize::try_from(value).unwrap_or(usize::MAX),
            None => policy::DEFAULT_MAX_CONCURRENT_TASKS,
        };

        let max_timeout = match l.pick(
            "max_timeout_ms",
            "AGENT_MAX_TIMEOUT_MS",
            f.max_timeout_ms,
            parse_u64,
        )? {
            Some(Sourced { value: 0, origin }) => {
                return Err(invalid("max_timeout_ms", origin, Problem::Zero));
            }
            Some(Sourced { value, .. }) => Duration::from_millis(value),
            None => policy::DEFAULT_MAX_TIMEOUT,
        };

        let probe_allow = resolve_cidrs(&l, "probe_allow", "AGENT_PROBE_ALLOW", f.probe_allow)?;
        let probe_deny = resolve_cidrs(&l, "probe_deny", "AGENT_PROBE_DENY", f.probe_deny)?;
        let tls = resolve_tls(&l, f.tls_ca_file, f.tls_pin_sha256, &gateways)?;
        let scheduler_url = match l.pick(
            "scheduler_url",
            "AGENT_SCHEDULER_URL",
            f.scheduler_url,
            |s| Ok(s.to_owned()),
        )? {
            Some(Sourced { value, .. }) if value.trim().is_empty() => None,
            Some(Sourced { value, origin }) => {
                let lower = value.to_ascii_lowercase();
                if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                    return Err(invalid(
                        "scheduler_url",
                        origin,
                        Problem::SchedulerUrl { url: value },
                    ));
                }
                Some(value.trim_end_matches('/').to_owned())
            }
            None => None,
        };
        let tunnel_allow = match l.pick(
            "tunnel_allow",
            "AGENT_TUNNEL_ALLOW",
            f.tunnel_allow,
            parse_list,
        )? {
            Some(Sourced { value, origin }) => {
                for entry in &value {
                    check_tunnel_address(entry)
                        .map_err(|p| invalid("tunnel_allow", origin.clone(), p))?;
                }
                value
            }
            None => Vec::new(),
        };
        let tunnel_max_streams = match l.pick(
            "tunnel_max_streams",
            "AGENT_TUNNEL_MAX_STREAMS",
            f.tunnel_max_streams,
            parse_u64,
        )? {
            Some(Sourced { value: 0, origin }) => {
                return Err(invalid("tunnel_max_streams", origin, Problem::Zero));
            }
            Some(Sourced { value, .. }) => usize::try_from(value).unwrap_or(usize::MAX),
            None => DEFAULT_TUNNEL_MAX_STREAMS,
        };
        let tunnel_frames_per_sec = match l.pick(
            "tunnel_frames_per_sec",
            "AGENT_TUNNEL_FRAMES_PER_SEC",
            f.tunnel_frames_per_sec,
            parse_u64,
        )? {
            Some(Sourced { value: 0, origin }) => {
                return Err(invalid("tunnel_frames_per_sec", origin, Problem::Zero));
            }
            Some(Sourced { value, .. }) => u32::try_from(value).unwrap_or(u32::MAX),
            None => DEFAULT_TUNNEL_FRAMES_PER_SEC,
        };
        let reported_version = env("AGENT_REPORTED_VERSION")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
        let upgrade_state_path = outbox_path.with_file_name("upgrade.json");
        let upgrade_probe = env("AGENT_UPGRADE_PROBE").is_some_and(|v| v.trim() == "1");

        Ok(AgentConfig {
            node_id: node_id_value,
            token,
            token_file,
            gateways: gateways.value,
            labels,
            outbox_path,
            heartbeat,
            resend_after,
            report_period,
            backoff,
            allowed_commands,
            metrics_listen,
            relay_listen,
            insecure_relay,
            command_keys,
            credential_path,
            config_dir,
            config_state_path,
            command_search_path,
            allowed_env,
            allowed_cwd_roots,
            max_concurrent_tasks,
            max_timeout,
            probe_allow,
            probe_deny,
            tls,
            scheduler_url,
            upgrade_state_path,
            reported_version,
            upgrade_probe,
            tunnel_allow,
            tunnel_max_streams,
            tunnel_frames_per_sec,
            file: path.map(Path::to_path_buf),
        })
    }

    /// The rules the executor checks tasks against.
    pub fn exec_policy(&self) -> ExecPolicy {
        ExecPolicy {
            allowed_commands: self.allowed_commands.clone(),
            search_path: self.command_search_path.clone(),
            allowed_env: self.allowed_env.iter().cloned().collect(),
            allowed_cwd_roots: self.allowed_cwd_roots.clone(),
            max_concurrent_tasks: self.max_concurrent_tasks,
            max_timeout: self.max_timeout,
            probe_allow: self.probe_allow.clone(),
            probe_deny: self.probe_deny.clone(),
        }
    }
}

fn resolve_cidrs<E: Fn(&str) -> Option<String>>(
    l: &Layers<'_, E>,
    field: &'static str,
    var: &'static str,
    from_file: Option<Vec<String>>,
) -> Result<Vec<Cidr>, ConfigError> {
    match l.pick(field, var, from_file, parse_list)? {
        Some(Sourced { value, origin }) => value
            .iter()
            .map(|c| {
                c.trim()
                    .parse::<Cidr>()
                    .map_err(|e| invalid(field, origin.clone(), Problem::Cidr(e)))
            })
            .collect(),
        None => Ok(Vec::new()),
    }
}

/// Loads the trust anchors (the CA file, or the system store when a `wss://` gateway needs
/// one) and the pins, so a broken TLS setting stops the agent at start instead of failing
/// every connection attempt later.
fn resolve_tls<E: Fn(&str) -> Option<String>>(
    l: &Layers<'_, E>,
    file_ca: Option<PathBuf>,
    file_pins: Option<Vec<String>>,
    gateways: &Sourced<Vec<String>>,
) -> Result<TlsSettings, ConfigError> {
    let uses_tls = gateways
        .value
        .iter()
        .any(|u| u.to_ascii_lowercase().starts_with("wss://"));
    // Empty means unset, so `AGENT_TLS_CA_FILE=` falls back to the system store.
    let ca = match l.pick("tls_ca_file", "AGENT_TLS_CA_FILE", file_ca, parse_path)? {
        Some(s) if s.value.as_os_str().is_empty() => None,
        Some(s) => Some((l.resolve(s.value, &s.origin), s.origin)),
        None => None,
    };
    let (pins, pins_origin) = match l.pick(
        "tls_pin_sha256",
        "AGENT_TLS_PIN_SHA256",
        file_pins,
        parse_list,
    )? {
        Some(Sourced { value, origin }) => {
            let pins = value
                .iter()
                .map(|p| p.parse::<SpkiPin>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("tls_pin_sha256", origin.clone(), Problem::Pin(e)))?;
            (pins, origin)
        }
        None => (Vec::new(), Origin::Default),
    };
    if !pins.is_empty() && !uses_tls {
        return Err(invalid(
            "tls_pin_sha256",
            pins_origin,
            Problem::PinsWithoutTls,
        ));
    }
    let roots = match &ca {
        // Read even when no gateway uses wss:// yet: a broken file is reported now.
        Some((path, origin)) => Some(
            servicekit::tls::roots_from_file(path)
                .map_err(|e| invalid("tls_ca_file", origin.clone(), Problem::Tls(e)))?,
        ),
        None if uses_tls => Some(
            servicekit::tls::platform_roots()
                .map_err(|e| invalid("tls_ca_file", Origin::Default, Problem::Tls(e)))?,
        ),
        None => None,
    };
    let client = match roots {
        Some(roots) if uses_tls => {
            let origin = ca
                .as_ref()
                .map_or(Origin::Default, |(_, origin)| origin.clone());
            Some(Arc::new(
                servicekit::tls::client_config(roots, &pins)
                    .map_err(|e| invalid("tls_ca_file", origin, Problem::Tls(e)))?,
            ))
        }
        _ => None,
    };
    Ok(TlsSettings {
        ca_file: ca.map(|(path, _)| path),
        pins,
        client,
    })
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            source: Box::new(e),
        }
    })
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// How long an outbox entry may stay unacknowledged before it is sent again.
pub(crate) const DEFAULT_RESEND_AFTER: Duration = Duration::from_secs(15);

fn positive_secs(field: &'static str, v: Sourced<u64>) -> Result<Duration, ConfigError> {
    if v.value == 0 {
        return Err(invalid(field, v.origin, Problem::Zero));
    }
    Ok(Duration::from_secs(v.value))
}

/// The token comes either inline or from a file. Each layer sets the credential as a whole:
/// an `AGENT_TOKEN` or `AGENT_TOKEN_FILE` replaces both of the file's keys, so a deployment
/// can override a file's `token_file` with an inline token and vice versa.
fn resolve_token<E: Fn(&str) -> Option<String>>(
    l: &Layers<'_, E>,
    file_token: Option<String>,
    file_token_file: Option<PathBuf>,
) -> Result<(Token, Option<PathBuf>), ConfigError> {
    let env_token = (l.env)("AGENT_TOKEN");
    let env_file = (l.env)("AGENT_TOKEN_FILE");
    let (token, token_file, origin) = match (env_token, env_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "token",
                Origin::Env("AGENT_TOKEN"),
                Problem::TokenAndTokenFile,
            ));
        }
        (Some(t), None) => (Some(t), None, Origin::Env("AGENT_TOKEN")),
        (None, Some(p)) => (
            None,
            Some(PathBuf::from(p.trim())),
            Origin::Env("AGENT_TOKEN_FILE"),
        ),
        (None, None) => (file_token, file_token_file, l.file_origin()),
    };
    match (token, token_file) {
        (Some(_), Some(_)) => Err(invalid("token", origin, Problem::TokenAndTokenFile)),
        (None, None) => Err(l.missing("token", "AGENT_TOKEN")),
        (Some(t), None) => Ok((check_token("token", origin, &t)?, None)),
        (None, Some(p)) => {
            if p.as_os_str().is_empty() {
                return Err(invalid("token_file", origin, Problem::EmptyPath));
            }
            let p = l.resolve(p, &origin);
            let text = std::fs::read_to_string(&p).map_err(|source| {
                invalid(
                    "token_file",
                    origin.clone(),
                    Problem::TokenFile {
                        path: p.clone(),
                        source,
                    },
                )
            })?;
            Ok((check_token("token_file", origin, &text)?, Some(p)))
        }
    }
}

fn check_token(field: &'static str, origin: Origin, raw: &str) -> Result<Token, ConfigError> {
    // Surrounding whitespace is trimmed: token files usually end with a newline.
    let t = raw.trim();
    if t.is_empty() {
        return Err(invalid(field, origin, Problem::EmptyToken));
    }
    // The token travels in an HTTP header; whitespace inside it is a copy-paste accident.
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(field, origin, Problem::TokenCharacters));
    }
    Ok(Token(t.to_owned()))
}

fn resolve_backoff<E: Fn(&str) -> Option<String>>(
    l: &Layers<'_, E>,
    f: FileBackoff,
) -> Result<ExponentialBackoff, ConfigError> {
    let base = l.pick(
        "backoff.base_ms",
        "AGENT_BACKOFF_BASE_MS",
        f.base_ms,
        parse_u64,
    )?;
    let cap = l.pick(
        "backoff.cap_ms",
        "AGENT_BACKOFF_CAP_MS",
        f.cap_ms,
        parse_u64,
    )?;
    let jitter = l.pick(
        "backoff.jitter",
        "AGENT_BACKOFF_JITTER",
        f.jitter,
        parse_f64,
    )?;
    let d = ExponentialBackoff::default();
    let (base_d, base_o) = match base {
        Some(s) => (Duration::from_millis(s.value), s.origin),
        None => (d.base(), Origin::Default),
    };
    let (cap_d, cap_o) = match cap {
        Some(s) => (Duration::from_millis(s.value), s.origin),
        None => (d.cap(), Origin::Default),
    };
    let (jitter_v, jitter_o) = match jitter {
        Some(s) => (s.value, s.origin),
        None => (d.jitter(), Origin::Default),
    };
    ExponentialBackoff::new(base_d, cap_d, jitter_v).map_err(|e| {
        // Name the setting that is wrong; for base > cap, the one that was set explicitly
        // (a base above the default cap is reported on base).
        let (field, origin) = match e {
            BackoffError::ZeroBase => ("backoff.base_ms", base_o),
            BackoffError::Jitter(_) => ("backoff.jitter", jitter_o),
            BackoffError::BaseAboveCap { .. } => match (&base_o, &cap_o) {
                (Origin::Default, _) => ("backoff.cap_ms", cap_o),
                _ => ("backoff.base_ms", base_o),
            },
        };
        invalid(field, origin, Problem::Backoff(e))
    })
}

/// Where a relay listens for its downstream agents (`relay_listen`, ADR 0015).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayListen {
    /// A TCP address, `IP:port` (port 0: one the system picks).
    Tcp(SocketAddr),
    /// A unix socket file, `unix:/absolute/path`: created with mode 0660 (the agent's user
    /// and group may connect), replacing a stale file, removed when the agent stops.
    Unix(PathBuf),
}

impl RelayListen {
    fn parse(text: &str) -> Result<RelayListen, Problem> {
        let text = text.trim();
        match text.strip_prefix(UNIX_PREFIX) {
            Some(path) => unix_socket_path(path)
                .map(RelayListen::Unix)
                .map_err(|reason| Problem::RelayListen {
                    value: text.to_owned(),
                    reason,
                }),
            None => text
                .parse()
                .map(RelayListen::Tcp)
                .map_err(|_| Problem::RelayListen {
                    value: text.to_owned(),
                    reason: "not an IP:port address",
                }),
        }
    }
}

impl fmt::Display for RelayListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayListen::Tcp(addr) => write!(f, "{addr}"),
            RelayListen::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// Marks a unix socket path in `relay_listen` and in `via=`.
pub(crate) const UNIX_PREFIX: &str = "unix:";

/// Longest unix socket path: `sun_path` holds 108 bytes on Linux, with a terminating NUL.
const MAX_UNIX_PATH: usize = 107;

/// Checks the path of a `unix:` address: absolute (a relative one would depend on the
/// working directory of whoever connects), written with one leading slash (`unix://x`
/// reads like a URL whose `x` is a host, yet would name `/x`), and short enough to bind.
fn unix_socket_path(path: &str) -> Result<PathBuf, &'static str> {
    if path.is_empty() {
        return Err("the unix socket path is empty");
    }
    if !path.starts_with('/') {
        return Err("the unix socket path must be absolute (unix:/path)");
    }
    if path.starts_with("//") {
        return Err("write one slash after unix: (unix:/path), not a URL form");
    }
    if path.contains('\0') {
        return Err("the unix socket path contains a NUL byte");
    }
    if path.ends_with('/') {
        return Err("the unix socket path names a directory");
    }
    if path.len() > MAX_UNIX_PATH {
        return Err("the unix socket path is longer than 107 bytes");
    }
    Ok(PathBuf::from(path))
}

/// Where a downstream agent opens its connection instead of the gateway's address: the
/// `via=` of a gateway URL (ADR 0015).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Via {
    /// `via=host:port`.
    Tcp(String),
    /// `via=unix:/absolute/path` (percent-encoded bytes decoded).
    Unix(PathBuf),
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Tcp(addr) => f.write_str(addr),
            Via::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

/// Whether a gateway URL names a relay (valid or not: the URL check reports a bad one).
fn has_via(url: &str) -> bool {
    via_values(url).next().is_some()
}

/// The raw `via=` values of a URL's query.
fn via_values(url: &str) -> impl Iterator<Item = &str> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("via="))
}

/// The relay a gateway URL reaches its gateway through (ADR 0015), if it names one:
/// `via=host:port` or `via=unix:/absolute/path` (percent-encoding is decoded first, so a
/// path may hold `&`, `#` or spaces as `%26`, `%23`, `%20`). Only the connection goes to
/// the relay; TLS and the HTTP upgrade still name the URL's host, so the gateway's
/// certificate is checked end to end.
pub(crate) fn via_of(url: &str) -> Result<Option<Via>, &'static str> {
    let mut values = via_values(url);
    let Some(raw) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("has more than one via=");
    }
    let value = percent_decode(raw).ok_or("has a via= with bad percent-encoding")?;
    if let Some(path) = value.strip_prefix(UNIX_PREFIX) {
        return unix_socket_path(path).map(|p| Some(Via::Unix(p))).map_err(|_| {
            "has a via=unix: that is not an absolute socket path (via=unix:/path/to/relay.sock)"
        });
    }
    let host_port = value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !host_port || value.contains('/') || value.chars().any(char::is_whitespace) {
        return Err("has a via= that is neither host:port nor unix:/path");
    }
    Ok(Some(Via::Tcp(value)))
}

/// `%XX` sequences decoded; `None` for a truncated or non-hex sequence or a result that
/// is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `text` with every byte but unreserved ones and `/` percent-encoded, so a socket path
/// survives as one `via=` query value (the inverse of [`percent_decode`]).
pub(crate) fn percent_encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Checks a gateway URL enough to catch configuration mistakes (wrong scheme, missing
/// host, bad port, credentials in the URL, a bad `via=`); the WebSocket client does the
/// full parse.
fn check_gateway_url(url: &str) -> Result<(), Problem> {
    let bad = |reason| Problem::GatewayUrl {
        url: url.to_owned(),
        reason,
    };
    via_of(url).map_err(bad)?;
    let lower = url.to_ascii_lowercase();
    let rest = if lower.starts_with("ws://") {
        url.get(5..)
    } else if lower.starts_with("wss://") {
        url.get(6..)
    } else {
        None
    };
    let Some(rest) = rest else {
        return Err(Problem::GatewayScheme {
            url: url.to_owned(),
        });
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    // The token is configured separately; a URL with user:password@ would leak it into logs.
    if authority.contains('@') {
        return Err(bad(
            "must not contain credentials (use token or token_file)",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(bad("has an unterminated [IPv6] host"));
        };
        match after {
            "" => (host, None),
            p => match p.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad("has junk after the [IPv6] host")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(bad("has an invalid port")),
        }
    }
    Ok(())
}

/// Labels feed the scheduler's `key=value` selectors, so keys and values are restricted to
/// characters that cannot break that syntax.
fn check_label(key: &str, value: &str) -> Result<(), Problem> {
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'))
    };
    let bad = |reason| Problem::Label {
        label: key.to_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    if key.len() > MAX_LABEL_LEN || value.len() > MAX_LABEL_LEN {
        return Err(bad("key or value is longer than 128 bytes"));
    }
    if !ok(key) || !ok(value) {
        return Err(bad("only A-Z a-z 0-9 . _ - / : are allowed"));
    }
    Ok(())
}

/// An allowed command is a bare program name (looked up on `command_search_path` when run)
/// or an absolute
/// path. Relative paths with a slash are refused: what they name depends on the task's
/// working directory, which the task chooses.
fn check_command(entry: &str) -> Result<(), Problem> {
    let bad = |reason| Problem::Command {
        entry: entry.to_owned(),
        reason,
    };
    if entry.trim().is_empty() {
        return Err(bad("is empty"));
    }
    if entry.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if entry.contains('/') && !entry.starts_with('/') {
        return Err(bad("must be a program name or an absolute path"));
    }
    Ok(())
}

/// A search path directory or cwd root must be absolute (a relative one would depend on
/// the agent's working directory). A search path entry becomes part of the child's `PATH`,
/// so it cannot contain the `:` separator.
fn check_directory(entry: &str, in_path_var: bool) -> Result<(), Problem> {
    let bad = |reason| Problem::Directory {
        entry: entry.to_owned(),
        reason,
    };
    if entry.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if !entry.starts_with('/') {
        return Err(bad("must be an absolute path"));
    }
    if in_path_var && entry.contains(':') {
        return Err(bad("must not contain ':' (it becomes the commands' PATH)"));
    }
    Ok(())
}

fn check_env_name(name: &str) -> Result<(), Problem> {
    let bad = |reason| Problem::EnvName {
        name: name.to_owned(),
        reason,
    };
    if !policy::is_env_name(name) {
        return Err(bad("is not a variable name (letters, digits and _)"));
    }
    if policy::is_forbidden_env(name) {
        return Err(bad(
            "may never be set by a task: it changes what programs load or what shells run",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_allowlist_entries_are_host_and_port() {
        for ok in ["127.0.0.1:22", "[::1]:9090", "db.internal:5432"] {
            assert!(check_tunnel_address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "127.0.0.1", ":22", "h:0", "h:65536", "a b:1", "h:x"] {
            assert!(
                matches!(check_tunnel_address(bad), Err(Problem::TunnelAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn via_names_a_tcp_relay_or_a_unix_socket() {
        assert_eq!(via_of("wss://gw/ws"), Ok(None));
        assert_eq!(
            via_of("wss://gw/ws?via=10.0.0.5:7000"),
            Ok(Some(Via::Tcp("10.0.0.5:7000".into())))
        );
        assert_eq!(
            via_of("wss://gw/ws?codec=json&via=unix:/run/edge/relay.sock#f"),
            Ok(Some(Via::Unix("/run/edge/relay.sock".into())))
        );
        // Percent-encoded, whole or in part: the same socket.
        for url in [
            "wss://gw/ws?via=unix%3A%2Frun%2Fedge%2Frelay.sock",
            "wss://gw/ws?via=unix:/run/edge/relay%2Esock",
        ] {
            assert_eq!(
                via_of(url),
                Ok(Some(Via::Unix("/run/edge/relay.sock".into()))),
                "{url}"
            );
        }
        assert_eq!(
            via_of("wss://gw/ws?via=unix:/run/a%20b%26c.sock"),
            Ok(Some(Via::Unix("/run/a b&c.sock".into())))
        );
    }

    #[test]
    fn bad_vias_are_refused() {
        let long = format!("wss://gw/ws?via=unix:/{}", "x".repeat(107));
        for bad in [
            "wss://gw/ws?via=",
            "wss://gw/ws?via=unix:",
            "wss://gw/ws?via=unix:relay.sock",
            "wss://gw/ws?via=unix:./relay.sock",
            "wss://gw/ws?via=unix:host:7000",
            "wss://gw/ws?via=unix://run/relay.sock",
            "wss://gw/ws?via=unix:/run/edge/",
            "wss://gw/ws?via=unix:/run/a%00b",
            "wss://gw/ws?via=unix:/run/a%2",
            "wss://gw/ws?via=unix:/run/a%zz",
            "wss://gw/ws?via=unix:/run/a%FF",
            "wss://gw/ws?via=10.0.0.5:7000&via=unix:/run/relay.sock",
            "wss://gw/ws?via=10.0.0.5",
            "wss://gw/ws?via=10.0.0.5:0",
            "wss://gw/ws?via=/run/relay.sock",
            "wss://gw/ws?via=:7000",
            long.as_str(),
        ] {
            assert!(via_of(bad).is_err(), "{bad}");
            assert!(
                matches!(check_gateway_url(bad), Err(Problem::GatewayUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn relay_listen_is_ip_port_or_an_absolute_unix_path() {
        assert_eq!(
            RelayListen::parse(" unix:/run/edge/relay.sock ").ok(),
            Some(RelayListen::Unix("/run/edge/relay.sock".into()))
        );
        assert_eq!(
            RelayListen::parse("10.0.0.5:7000").ok(),
            Some(RelayListen::Tcp(([10, 0, 0, 5], 7000).into()))
        );
        for bad in [
            "unix:",
            "unix:relay.sock",
            "unix://run/relay.sock",
            "unix:/run/",
            "/run/relay.sock",
            "relay.example:7000",
            "unix:/run/a\0b",
        ] {
            assert!(
                matches!(RelayListen::parse(bad), Err(Problem::RelayListen { .. })),
                "{bad}"
            );
        }
        let text = RelayListen::Unix("/run/edge/relay.sock".into()).to_string();
        assert_eq!(text, "unix:/run/edge/relay.sock");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 5), (3, 1));
    }

    #[test]
    fn gateway_urls() {
        for ok in [
            "ws://127.0.0.1:8081/ws",
            "wss://gw.example/ws?x=1",
            "WS://gw",
            "ws://[::1]:8081/ws",
            "ws://[::1]",
        ] {
            assert!(check_gateway_url(ok).is_ok(), "{ok}");
        }
        assert!(matches!(
            check_gateway_url("http://gw/ws"),
            Err(Problem::GatewayScheme { .. })
        ));
        for bad in [
            "ws://",
            "ws:///ws",
            "ws://gw:0",
            "ws://gw:99999",
            "ws://gw:x",
            "ws://u:p@gw",
            "ws://[::1",
            "ws://[::1]x",
            "ws://g w",
            "ws://:80",
        ] {
            assert!(
                matches!(check_gateway_url(bad), Err(Problem::GatewayUrl { .. })),
                "{bad}"
            );
        }
    }
}
