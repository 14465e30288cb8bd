//! Load generator: opens many real WebSocket connections to one or more gateways and runs
//! a scenario against them. Client side only: it speaks the wire protocol through
//! `libs/messages`, the bus through NATS and the services' HTTP APIs, and never links a
//! service crate.
//!
//! - `run`: the multi-process scenarios (connect storm, periodic broadcast with or without
//!   receipts and churn, fleet of simulated agents); the process re-executes itself as
//!   `worker`s, aggregates their per-second lines, and writes a summary table, JSON and an
//!   HTML report ([`coordinator`], [`worker`], [`report`]).
//! - `hostile`, `hostile-report`: slow and hostile clients next to a normal run, and the
//!   verdict comparing the runs with and without them ([`hostile`]).
//! - `connect`, `idle`, `fanout`, `api-push`: the single-process scenarios used by
//!   `scenarios/gateway-bench.sh` and `scenarios/api-bench.sh` ([`legacy`]).
//!
//! Client sockets are bound to several 127.0.0.x source addresses so one process does not
//! run out of ephemeral ports; one process holds at most ~19,900 sockets here (`ulimit
//! -Hn` is 20,000), so larger runs use several workers.

mod client;
mod configpush;
mod coordinator;
mod failover;
mod hist;
mod hostile;
mod http;
mod legacy;
mod natsws;
mod outbox;
mod presence;
mod procfs;
mod redial;
mod report;
mod rollout;
mod trend;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "loadtest", about = "WebSocket load generator for ws-gateway")]
pub struct Cli {
    /// Gateway WebSocket URLs, comma-separated (connections are spread round-robin).
    #[arg(long, env = "LOADTEST_URLS", default_value = "ws://127.0.0.1:8080/ws")]
    urls: String,
    /// HS256 secret to sign client tokens with (must match the gateways').
    #[arg(
        long,
        env = "LOADTEST_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    secret: String,
    /// The agent-token private key (Ed25519 PEM, the scheduler's
    /// `SCHEDULER_AGENT_TOKEN_KEY_FILE`): simulated agents sign their tokens with it, since
    /// gateways accept agents only with agent-token-signed credentials.
    #[arg(long, env = "LOADTEST_AGENT_TOKEN_KEY_FILE")]
    agent_token_key_file: Option<std::path::PathBuf>,
    /// Connections to open (over all workers).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Source addresses per process, 127.0.0.2 upwards, to spread client ports over.
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Handshakes in flight at once (per process).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Prefix of the user ids (`<prefix>-<n>`), so several runs do not collide.
    #[arg(long, default_value = "lt")]
    user_prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A multi-process scenario with live progress, summary, JSON and HTML report.
    Run(Box<coordinator::RunArgs>),
    /// Internal: one worker process of `run` (spec as JSON).
    #[command(hide = true)]
    Worker {
        /// The worker's spec.
        #[arg(long)]
        spec: String,
    },
    /// Slow and hostile clients next to a normal run: how the gateway cuts each kind.
    Hostile(hostile::Args),
    /// The verdict of a hostile-clients run: run A (normal clients), run B (with hostile
    /// ones) and the hostile clients' results, against thresholds.
    HostileReport(hostile::verdict::ReportArgs),
    #[command(flatten)]
    Legacy(Legacy),
}

/// The single-process scenarios.
#[derive(Debug, Subcommand)]
pub enum Legacy {
    /// Open connections as fast as allowed, report the accept rate, close.
    Connect,
    /// Hold connections; report the gateway's RSS per connection when `--pid` is given.
    Idle {
        /// Seconds to hold the connections.
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
        /// Gateway process id whose VmRSS to sample.
        #[arg(long)]
        pid: Option<u32>,
    },
    /// Push through ws-api's HTTP API to random connected users and measure HTTP call ->
    /// client latency and accepted pushes per second.
    ApiPush {
        /// ws-api address (host:port).
        #[arg(long, default_value = "127.0.0.1:8090")]
        api: String,
        /// ws-api key.
        #[arg(long, env = "LOADTEST_API_KEY", hide_env_values = true)]
        api_key: String,
        /// Pushes to send.
        #[arg(long, default_value_t = 10_000)]
        pushes: usize,
        /// HTTP requests in flight (one keep-alive connection each).
        #[arg(long, default_value_t = 16)]
        http_concurrency: usize,
        /// Body size, bytes (at least 8).
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// Broadcast pushes through NATS and measure delivery.
    Fanout {
        /// NATS URL to publish on.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Pushes to publish.
        #[arg(long, default_value_t = 100)]
        messages: usize,
        /// Body size of each push, bytes (at least 8: the send time is stamped in it).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Pushes per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Worker { spec } => {
                let spec: worker::WorkerSpec = serde_json::from_str(spec)?;
                worker::run(spec).await.map(|()| true)
            }
            Command::Run(args) => {
                if cli.secret.is_empty() {
                    return Err("LOADTEST_SECRET / --secret is required".into());
                }
                let agent_key = match &cli.agent_token_key_file {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                    None => String::new(),
                };
                let common = coordinator::Common {
                    urls: split_urls(&cli.urls),
                    secret: cli.secret.clone(),
                    agent_key,
                    connections: cli.connections,
                    sources: cli.sources,
                    concurrency: cli.concurrency,
                    user_prefix: cli.user_prefix.clone(),
                };
                coordinator::run(common, (**args).clone()).await
            }
            Command::Hostile(args) => {
                if cli.secret.is_empty() {
                    return Err("LOADTEST_SECRET / --secret is required".into());
                }
                hostile::run(&split_urls(&cli.urls), &cli.secret, args.clone())
                    .await
                    .map(|()| true)
            }
            Command::HostileReport(args) => hostile::verdict::run(args),
            Command::Legacy(l) => legacy::run(&cli, l).await.map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadtest: thresholds not met");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Splits a comma-separated URL list.
pub fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}
