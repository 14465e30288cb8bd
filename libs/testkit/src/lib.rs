//! Real infrastructure for tests: `nats-server` processes started on free loopback ports in
//! temporary directories, killed and cleaned up on drop, and a WebSocket client that speaks
//! the frame protocol over a real socket; [`tls`] adds a test CA and a TLS-terminating
//! proxy for testing clients over real TLS; [`gateway`] is the one in-process ws-gateway
//! fixture the other crates' tests share; [`fleetbus`] is a fake gateway on the bus for the
//! scheduler's tests; [`browser`] drives a real headless Chromium over WebDriver and serves
//! test pages; [`agent`] renders the configuration test agents start from.
//!
//! [`NatsServer`] is one node with JetStream that can be killed and started again on the
//! same port with the same storage (for reconnect and outage tests). [`NatsCluster`] is
//! three (or more) routed nodes with clustered JetStream. Both read their settings from the
//! repository's `nats/` configs, the same files `scripts/up` and compose use.
//!
//! The binary is found through `NATS_SERVER_BIN`, then `.tools/bin/nats-server` (where
//! `scripts/install-nats` puts it), then `PATH`. When none exists, starting fails with one
//! line that says how to install it.

// A test-support crate: its helpers fail the calling test by panicking, on purpose.
#![allow(clippy::panic)]

pub mod agent;
pub mod browser;
pub mod cutproxy;
pub mod fleetbus;
pub mod gateway;
pub mod http;
pub mod otlp;
pub mod process;
mod server;
pub mod tls;
pub mod ws;

pub use server::{Error, NatsCluster, NatsServer, nats_server_binary, workspace_root};
