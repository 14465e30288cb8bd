//! agent: the edge daemon. It holds one WebSocket to a gateway for heartbeats, reports,
//! tasks and results.
//!
//! Built so far: the pieces the connection loop stands on.
//! - [`config`]: the TOML file plus `AGENT_*` overrides, validated into [`AgentConfig`].
//! - [`outbox`]: the durable redb queue every report and result passes through, so nothing
//!   is lost across disconnects or a kill -9.
//! - [`backoff`]: reconnect delays (capped exponential with jitter).

pub mod backoff;
pub mod config;
pub mod outbox;

pub use backoff::{BackoffError, ExponentialBackoff};
pub use config::{AgentConfig, ConfigError, Origin, Problem, Token};
pub use outbox::{Entry, MessageId, Outbox, OutboxError};
