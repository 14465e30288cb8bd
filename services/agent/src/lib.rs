//! agent: the edge daemon. It holds one WebSocket to a gateway for heartbeats, reports,
//! tasks and results.
//!
//! - [`config`]: the TOML file plus `AGENT_*` overrides, validated into [`AgentConfig`].
//! - [`configs`]: config documents the control plane pushes (versioned, signed), written
//!   atomically into `config_dir`, validated and reloaded through the allowlist, acked.
//! - [`connection`]: the connection loop (connect, welcome, register, outbox replay,
//!   heartbeats, pushes, reconnect policy) and [`start`], which runs an agent.
//! - [`executor`]: runs tasks (allowlisted commands in their own process group, TCP and
//!   HTTP probes) and writes each result to the outbox before it is sent.
//! - [`policy`]: what a task may do (program lookup, environment, working directory,
//!   caps, probe destinations), checked before anything runs.
//! - [`outbox`]: the durable redb queue every report and result passes through, so nothing
//!   is lost across disconnects or a kill -9.
//! - [`upgrade`]: signed self-upgrades (download, verify, swap, restart) and the watchdog
//!   that restores the previous binary when the new one does not come back online.
//! - [`relay`]: relay mode (`relay_listen`): downstream agents' connections carried as
//!   streams over one gateway connection (ADR 0015), on `IP:port` or a unix socket file.
//! - [`transport`]: the stream under a WebSocket: TCP, or a unix socket to a relay.
//! - [`backoff`]: reconnect delays (capped exponential with jitter).
//! - [`metrics`]: host CPU, memory and disk samples for status reports.
//! - [`agent_metrics`]: the agent's own Prometheus counters and gauges ([`AgentMetrics`]),
//!   served on the optional `/metrics` + `/healthz` endpoint (`metrics_listen`) by
//!   `servicekit::metrics_server`.

mod agent_metrics;
mod backoff;
mod config;
mod configs;
mod connection;
pub mod executor;
mod metrics;
mod outbox;
pub mod output;
mod policy;
mod relay;
mod transport;
mod trust;
mod tunnel;
pub mod upgrade;

pub use agent_metrics::AgentMetrics;
pub use backoff::{BackoffError, ExponentialBackoff};
pub use config::{AgentConfig, ConfigError, Origin, Problem, RelayListen, TlsSettings, Token};
pub use connection::{AgentHandle, RunError, start};
pub use executor::{ExecEvent, Execution, Executor};
pub use outbox::{Entry, MessageId, Outbox, OutboxError};
pub use policy::{Cidr, ExecPolicy, Refusal, check_probe_text};
pub use trust::{Gate, GateError};
