//! The connection loop: one WebSocket to one gateway at a time, for everything.
//!
//! This module owns the session lifecycle (connect with the token, welcome, register,
//! outbox replay, heartbeats, pushes, close) and the reconnect policy between sessions.
//! Task execution lives in [`crate::executor`] and durability in [`crate::outbox`]; this
//! loop only moves their frames.
//!
//! Reconnect policy (`docs/protocol.md` section 13.1):
//! - Gateways are picked at random, and after a failure a different one than the one that
//!   failed is preferred, so a dead replica is not retried while others are up.
//! - Between attempts the configured [`ExponentialBackoff`] applies; the attempt counter
//!   resets once a session got its welcome.
//! - A reconnect frame (gateway drain) replaces the backoff with its `delay_ms`.
//! - 4502 (credential expired) reconnects at once with the newest credential (the control
//!   plane renews it over the live connection, see [`crate::trust`]); it never stops the
//!   agent. 4505 (revoked) and an HTTP 401/403 at the handshake are retried at the backoff
//!   cap, loudly: the change that fixes them (re-enrolment, a new token file) happens
//!   elsewhere, and a daemon that exits cannot notice it.
//! - Other codes in 4500-4999 (protocol error, frame too large, unsupported version, kicked)
//!   **stop the agent for good** after logging: they mean this agent and the gateway
//!   disagree on the protocol, which only an upgrade fixes. The process exits non-zero, so
//!   a supervisor (systemd) decides whether and when to start it again.
//!
//! Every push is a signed command; [`crate::trust::Gate`] admits it or the agent reports a
//! refusal (outboxed, at most [`REFUSAL_REPORTS_PER_MINUTE`] a minute so forged traffic
//! cannot fill the disk; the metric counts all).
//!
//! `wss://` gateways are reached with rustls, trusting the configured CA file or the
//! system store and checking the optional key pins ([`crate::config::TlsSettings`]). A
//! failed handshake (unknown CA, wrong name, pin mismatch) is a problem of one gateway or
//! of its certificate, not of this agent: it is logged with its cause and retried with
//! backoff like any other connection failure, so a fixed certificate is picked up without
//! a restart.
//!
//! Delivery: every result is in the outbox before it reaches this loop. After each
//! register the loop sends every pending entry again; an `agent.ack` push deletes the named
//! entries. Within one session an entry is sent at most once (a result that finishes while
//! the replay runs is not sent twice); across sessions it is re-sent until acked, and the
//! scheduler ingests by message id.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use messages::fleet::{self, Ack, Cancel, Register, Report, ReportBatch, Task, TaskResult};
use messages::payload::{self, ErrorBody, HeartbeatAck, Reconnect, Welcome};
use messages::{BodyCodec, CloseCode, Frame, FrameKind, Limits, Route, TraceContext};
use servicekit::metrics_server::MetricsServer;
use servicekit::telemetry::{MessageSpan, Operation};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::agent_metrics::AgentMetrics;
use crate::backoff::ExponentialBackoff;
use crate::config::{AgentConfig, Token, Via};
use crate::configs::{CONFIG_ACK_KIND, Configs};
use crate::executor::{ExecEvent, Executor, RESULT_KIND};
use crate::outbox::{Entry, MessageId, Outbox, OutboxError};
use crate::transport::Transport;
use crate::trust::{Credentials, Gate, GateError, REFUSED_KIND, refusal_report};
use crate::upgrade::{UPGRADE_RESULT_KIND, Upgrader};
use messages::command::Refusal;
use servicekit::clock::now_ms;

/// Most refusal reports written per minute; further refusals are only counted and logged.
pub(crate) const REFUSAL_REPORTS_PER_MINUTE: u32 = 30;

/// Outbox entry kind of a status report (a msgpack [`Report`]).
pub(crate) const REPORT_KIND: &str = "report";

/// Longest wait for TCP connect plus the WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the welcome after the handshake.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one frame to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Floor for the "no answer after a heartbeat" deadline, in case a gateway announces a
/// tiny grace.
const MIN_GRACE: Duration = Duration::from_secs(1);
/// Most outbox entries replayed per session; the rest follow on the next reconnect once
/// these are acked (bounds memory after a very long outage).
const REPLAY_LIMIT: usize = 50_000;
/// Reports per replayed batch frame, to stay well inside the gateway's body limit.
const REPORTS_PER_BATCH: usize = 100;
/// Largest message accepted from a gateway.
const MAX_MESSAGE: usize = 1 << 20;

type Ws = WebSocketStream<MaybeTlsStream<Transport>>;

/// Why the agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// A background task failed to complete.
    #[error("agent task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// A gateway closed the connection with a "do not reconnect" code (4500-4999).
    #[error("gateway {url} closed the connection with {code} ({reason}); not reconnecting")]
    Refused {
        /// The gateway.
        url: String,
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The configured `relay_listen` address could not be bound (or its socket file is
    /// in use, or is not a socket).
    #[error("cannot listen for downstream agents on {addr} (relay_listen): {source}")]
    RelayListen {
        /// The configured address.
        addr: crate::config::RelayListen,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configured `metrics_listen` address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsListen {
        /// The configured address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The record of applied config documents is unreadable.
    #[error(transparent)]
    ConfigState(#[from] crate::configs::StateError),
    /// The upgrade record could not be settled at start.
    #[error(transparent)]
    Upgrade(#[from] crate::upgrade::UpgradeError),
    /// No command keys are pinned: the agent could act on nothing, so it does not start.
    #[error(
        "no command keys pinned (command_keys_file / AGENT_COMMAND_KEYS_FILE): \
         every command would be refused"
    )]
    NoCommandKeys,
    /// A gateway rejected the token at the handshake.
    #[error("gateway {url} rejected the token (HTTP {status}); not reconnecting")]
    Unauthorized {
        /// The gateway.
        url: String,
        /// The HTTP status.
        status: u16,
    },
}

impl RunError {
    /// The process exit code for this error (sysexits.h values).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Outbox(_) => 74, // EX_IOERR
            RunError::ConfigState(_) | RunError::Upgrade(_) => 74,
            RunError::Join(_) => 70, // EX_SOFTWARE
            RunError::Refused { code, .. } if *code == CloseCode::Unauthorized.code() => 77,
            RunError::Refused { .. } => 76,      // EX_PROTOCOL
            RunError::Unauthorized { .. } => 77, // EX_NOPERM
            // The remedy is another `metrics_listen` (the address is taken or not local).
            RunError::MetricsListen { .. } | RunError::RelayListen { .. } => 78, // EX_CONFIG
            RunError::NoCommandKeys => 78,
        }
    }
}

/// Why one session ended.
#[derive(Debug)]
enum SessionEnd {
    /// The connection failed or was lost; `welcomed` says whether it got that far.
    Lost { welcomed: bool, reason: String },
    /// The gateway asked for a reconnect after `delay` (a drain).
    Reconnect { delay: Duration },
    /// Do not reconnect.
    Fatal(RunError),
    /// The control plane refuses this node (revoked, credential rejected): retry at the
    /// backoff cap, since the fix happens elsewhere.
    Locked { reason: String },
    /// The agent is shutting down.
    Shutdown,
}

/// Why a refusal report could not be written.
#[derive(Debug, thiserror::Error)]
enum RefuseError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("encode: {0}")]
    Encode(payload::PayloadError),
}

/// A running agent (connection loop and executor) on the current tokio runtime.
#[derive(Debug)]
pub struct AgentHandle {
    outbox: Arc<Outbox>,
    metrics: Arc<AgentMetrics>,
    metrics_addr: Option<SocketAddr>,
    relay_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
    restart: Arc<AtomicBool>,
}

impl AgentHandle {
    /// The agent's outbox (for inspection; the agent holds the file's lock).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The agent's counters and gauges (what `/metrics` serves).
    pub fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
    }

    /// Where the relay listens for downstream agents, if `relay_listen` is a TCP address
    /// (the bound address, so port 0 can be used); `None` for a unix socket, whose path is
    /// the configured one.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay_addr
    }

    /// Where the metrics endpoint listens, if `metrics_listen` is configured (the bound
    /// address: with port 0 in the configuration, the port the system chose).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Asks the agent to close its connection and stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the agent has stopped. Call it once: after it returned, the handle is
    /// spent.
    pub async fn join(&mut self) -> Result<(), RunError> {
        (&mut self.task).await?
    }

    /// Whether the agent stopped because a new binary was installed: then the caller hands
    /// over to it with [`crate::upgrade::hand_over`] (once [`AgentHandle::join`] returned
    /// `Ok` and the runtime is gone).
    pub fn restart_for_upgrade(&self) -> bool {
        self.restart.load(Ordering::SeqCst)
    }
}

/// Opens the outbox, binds the metrics endpoint if one is configured, and starts the agent.
/// Dropping the handle stops the agent too. The metrics endpoint stops with the agent
/// (however it stops), before [`AgentHandle::join`] returns.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, RunError> {
    if config.command_keys.as_ref().is_none_or(|k| k.is_empty()) {
        return Err(RunError::NoCommandKeys);
    }
    let path = config.outbox_path.clone();
    let outbox = Arc::new(tokio::task::spawn_blocking(move || Outbox::open(path)).await??);
    // A finished upgrade (this binary completed it, or is the restored one) is reported.
    {
        let (config, outbox) = (config.clone(), Arc::clone(&outbox));
        tokio::task::spawn_blocking(move || crate::upgrade::settle(&config, &outbox)).await??;
    }
    let (dir, state) = (config.config_dir.clone(), config.config_state_path.clone());
    let configs = Arc::new(tokio::task::spawn_blocking(move || Configs::open(dir, state)).await??);
    let metrics = Arc::new(AgentMetrics::new());
    let server = match config.metrics_listen {
        Some(addr) => Some(
            MetricsServer::bind(addr, scrape(Arc::clone(&metrics), Arc::downgrade(&outbox)))
                .await
                .map_err(|source| RunError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let metrics_addr = server.as_ref().map(MetricsServer::local_addr);
    let (stop, stopped) = watch::channel(false);
    // Relay mode: bound before anything runs, so a taken address fails the start.
    let mut config = config;
    let relay = match config.relay_listen.clone() {
        Some(addr) => {
            // Boxed: binding a socket file probes an old one, which would otherwise swell
            // every caller's `start` future.
            let (listener, local) = Box::pin(crate::relay::Listener::bind(&addr))
                .await
                .map_err(|source| RunError::RelayListen { addr, source })?;
            tracing::info!(%local, "Relay listening.");
            let relay = tokio::spawn(crate::relay::run(listener, config.clone(), stopped.clone()));
            config.gateways = crate::relay::own_gateways(&config.gateways, &local);
            Some((relay, local))
        }
        None => None,
    };
    let relay_addr = relay.as_ref().and_then(|(_, local)| match local {
        crate::config::RelayListen::Tcp(addr) => Some(*addr),
        crate::config::RelayListen::Unix(_) => None,
    });
    let restart = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let outbox = Arc::clone(&outbox);
        let metrics = Arc::clone(&metrics);
        let restart = Arc::clone(&restart);
        async move {
            let result = Box::pin(run(config, outbox, configs, stopped, metrics, restart)).await;
            if let Some(server) = server {
                server.stop().await;
            }
            if let Some((relay, _)) = relay {
                let _ = relay.await;
            }
            result
        }
    });
    Ok(AgentHandle {
        outbox,
        metrics,
        metrics_addr,
        relay_addr,
        stop,
        task,
        restart,
    })
}

/// What a scrape of `/metrics` answers: the metrics plus the outbox length, read on a
/// blocking thread. The outbox is held weakly, so a scrape in flight never keeps the
/// database open after the agent stopped.
fn scrape(
    metrics: Arc<AgentMetrics>,
    outbox: Weak<Outbox>,
) -> impl Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync + 'static {
    move || {
        let metrics = Arc::clone(&metrics);
        let outbox = outbox.upgrade();
        Box::pin(async move {
            let entries = match outbox {
                Some(outbox) => match tokio::task::spawn_blocking(move || outbox.len()).await {
                    Ok(Ok(n)) => Some(n),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "Cannot read the outbox length for metrics.");
                        None
                    }
                    Err(_) => None,
                },
                None => None,
            };
            metrics.encode(entries)
        })
    }
}

/// Shared state of the connection loop.
struct Ctx {
    config: AgentConfig,
    outbox: Arc<Outbox>,
    executor: Executor,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<AgentMetrics>,
    hostname: String,
    /// The last degraded/online status reported, re-sent after every register.
    status: Option<fleet::Status>,
    /// Each recent task's trace, continued by its started and result frames.
    traces: TaskTraces,
    /// Admits signed commands.
    gate: Arc<Gate>,
    /// What to connect with.
    credentials: Arc<Credentials>,
    /// Refusal reports left in this minute, and when the minute started.
    refusal_budget: (u32, Instant),
    /// Paces live output frames.
    output_pace: crate::output::Pace,
    /// The config documents applied (reported at every register).
    configs: Arc<Configs>,
    /// Verified config pushes, to the worker that applies them in order.
    config_tx: mpsc::UnboundedSender<fleet::ConfigPush>,
    /// Outbox deletions of acknowledged entries under way (each an fsync, off the loop).
    ack_tasks: tokio::task::JoinSet<()>,
    /// Runs upgrades.
    upgrader: Upgrader,
    /// Set when the loop stopped for an installed upgrade.
    restart: Arc<AtomicBool>,
    /// This session's tunnel streams.
    tunnels: crate::tunnel::Tunnels,
    /// Their upward frames, paced by the session loop.
    tunnel_up: mpsc::UnboundedReceiver<crate::tunnel::Up>,
}

/// Most tasks whose trace context is remembered (for results replayed after a reconnect).
const TRACED_TASKS: usize = 1024;

/// The trace of each recent task: the execution span (a child of the context the task
/// frame carried, open until the result is sent) and the context its frames carry.
#[derive(Debug, Default)]
struct TaskTraces {
    spans: HashMap<u64, MessageSpan>,
    contexts: HashMap<u64, TraceContext>,
    order: VecDeque<u64>,
}

impl TaskTraces {
    fn start(&mut self, task_id: u64, incoming: Option<&TraceContext>, msg_id: u64) {
        let span = MessageSpan::start(Operation::Process, fleet::down::TASK, msg_id, incoming);
        if let Some(context) = span.context()
            && self.contexts.insert(task_id, context).is_none()
        {
            self.order.push_back(task_id);
        }
        self.spans.insert(task_id, span);
        while self.order.len() > TRACED_TASKS {
            if let Some(old) = self.order.pop_front() {
                self.contexts.remove(&old);
                self.spans.remove(&old);
            }
        }
    }

    fn context(&self, task_id: u64) -> Option<TraceContext> {
        self.contexts.get(&task_id).copied()
    }

    fn trace_id(&self, task_id: u64) -> String {
        self.context(task_id)
            .map(|t| t.trace_id_hex())
            .unwrap_or_default()
    }

    fn finish(&mut self, task_id: u64) {
        self.spans.remove(&task_id);
    }
}

/// Runs sessions until shutdown or a fatal close, counting in `metrics`.
pub(crate) async fn run(
    config: AgentConfig,
    outbox: Arc<Outbox>,
    configs: Arc<Configs>,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<AgentMetrics>,
    restart: Arc<AtomicBool>,
) -> Result<(), RunError> {
    let (events_tx, events) = mpsc::unbounded_channel();
    // The report loop holds the outbox; it is stopped and awaited (not aborted) before
    // `run` returns, so the database is closed when the caller gets control back.
    let (stop_reports, reports_stopped) = watch::channel(false);
    let reporter = tokio::spawn(report_loop(
        Arc::clone(&outbox),
        config.outbox_path.clone(),
        config.report_period,
        events_tx.clone(),
        reports_stopped,
    ));
    // The config worker holds the outbox too: it ends once the session loop (which holds
    // its sender) is gone, and is awaited like the report loop.
    let (config_tx, config_worker) = crate::configs::spawn_worker(
        Arc::clone(&configs),
        config.exec_policy(),
        Arc::clone(&outbox),
        events_tx.clone(),
    );
    let result = run_sessions(
        config, outbox, configs, config_tx, shutdown, events_tx, events, metrics, restart,
    )
    .await;
    let _ = stop_reports.send(true);
    let _ = reporter.await;
    let _ = config_worker.await;
    result
}

/// Connects, serves sessions and reconnects until shutdown or a fatal close.
#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
async fn run_sessions(
    config: AgentConfig,
    outbox: Arc<Outbox>,
    configs: Arc<Configs>,
    config_tx: mpsc::UnboundedSender<fleet::ConfigPush>,
    shutdown: watch::Receiver<bool>,
    events_tx: mpsc::UnboundedSender<ExecEvent>,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    metrics: Arc<AgentMetrics>,
    restart: Arc<AtomicBool>,
) -> Result<(), RunError> {
    let upgrader = Upgrader::new(config.clone(), Arc::clone(&outbox), events_tx.clone());
    let executor = Executor::new(
        config.exec_policy(),
        Arc::clone(&outbox),
        events_tx,
        Arc::clone(&metrics),
    );
    let backoff: ExponentialBackoff = config.backoff;
    let node = config.node_id.to_string();
    let gate = Arc::new(Gate::new(
        &node,
        config.command_keys.clone().unwrap_or_default(),
    ));
    let credentials = Arc::new(Credentials::new(
        &node,
        config.token.clone(),
        config.token_file.clone(),
        config.credential_path.clone(),
    ));
    let (tunnel_tx, tunnel_up) = mpsc::unbounded_channel();
    let tunnels = crate::tunnel::Tunnels::new(
        config.tunnel_allow.clone(),
        config.tunnel_max_streams,
        tunnel_tx,
    );
    let mut ctx = Ctx {
        tunnels,
        tunnel_up,
        configs,
        config_tx,
        ack_tasks: tokio::task::JoinSet::new(),
        upgrader,
        restart,
        gate,
        credentials,
        refusal_budget: (REFUSAL_REPORTS_PER_MINUTE, Instant::now()),
        output_pace: crate::output::Pace::default(),
        config,
        outbox,
        executor,
        events,
        shutdown,
        metrics,
        hostname: hostname(),
        status: None,
        traces: TaskTraces::default(),
    };
    let mut attempt: u32 = 0;
    let mut last_failed: Option<usize> = None;
    let result = loop {
        let index = pick_gateway(ctx.config.gateways.len(), last_failed);
        let Some(url) = ctx.config.gateways.get(index).cloned() else {
            // Config validation guarantees at least one gateway; stay defensive anyway.
            break Ok(());
        };
        let end = ctx.session(&url).await;
        let delay = match end {
            SessionEnd::Shutdown => break Ok(()),
            SessionEnd::Fatal(e) => {
                tracing::error!(gateway = %url, error = %e, "Stopping for good.");
                break Err(e);
            }
            SessionEnd::Reconnect { delay } => {
                // A drain is not a failure: start the backoff afresh, but go elsewhere,
                // since this replica is going away.
                tracing::info!(gateway = %url, ?delay, "Gateway asked to reconnect.");
                attempt = 0;
                last_failed = Some(index);
                ctx.metrics.reconnect();
                delay
            }
            SessionEnd::Locked { reason } => {
                // Retrying fast would not help: wait as long as the backoff ever does.
                let delay = backoff.delay(u32::MAX);
                attempt = 0;
                last_failed = Some(index);
                ctx.metrics.reconnect();
                tracing::error!(gateway = %url, %reason, retry_in = ?delay, "Refused by the control plane; will retry.");
                delay
            }
            SessionEnd::Lost { welcomed, reason } => {
                if welcomed {
                    attempt = 0;
                }
                last_failed = Some(index);
                let delay = backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                ctx.metrics.reconnect();
                tracing::warn!(gateway = %url, %reason, retry_in = ?delay, "Disconnected; will retry.");
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = wait_shutdown(&mut ctx.shutdown) => break Ok(()),
        }
    };
    // Outbox deletions of acked entries still running hold the outbox: wait for them, so
    // it is closed when `run` returns.
    while ctx.ack_tasks.join_next().await.is_some() {}
    result
}

/// Samples the host a few times per report period, and once per period writes the averages
/// to the outbox as a report (then hands it to the session to send) and reports health
/// changes. Runs whether or not a gateway is reachable: reports made offline wait in the
/// outbox.
async fn report_loop(
    outbox: Arc<Outbox>,
    outbox_path: std::path::PathBuf,
    period: Duration,
    events: mpsc::UnboundedSender<ExecEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let sample_every = (period / 6).clamp(Duration::from_secs(1), Duration::from_secs(10));
    // A first reading primes the CPU counters, so even the first report has a CPU figure.
    let mut sampler = tokio::task::spawn_blocking(move || {
        let mut s = crate::metrics::Sampler::new(&outbox_path);
        s.sample();
        s
    })
    .await
    .ok();
    let mut degraded: Option<String> = None;
    let mut window_start = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(sample_every) => {}
            () = wait_shutdown(&mut shutdown) => return,
        }
        let Some(mut s) = sampler.take() else { return };
        let Ok(s) = tokio::task::spawn_blocking(move || {
            s.sample();
            s
        })
        .await
        else {
            return;
        };
        sampler = Some(s);
        if window_start.elapsed() < period {
            continue;
        }
        window_start = Instant::now();
        let Some(metrics) = sampler.as_mut().map(crate::metrics::Sampler::take) else {
            return;
        };
        let reason = crate::metrics::degraded_reason(&metrics);
        if reason != degraded {
            let state = if reason.is_some() {
                fleet::AgentState::Degraded
            } else {
                fleet::AgentState::Online
            };
            let _ = events.send(ExecEvent::Status(fleet::Status {
                state,
                reason: reason.clone(),
            }));
            degraded = reason;
        }
        let outbox = Arc::clone(&outbox);
        let at_ms = now_ms();
        let appended = tokio::task::spawn_blocking(move || {
            let mut encoded = Vec::new();
            let seq = outbox.append_with(REPORT_KIND, |id| {
                let report = Report {
                    message_id: id.to_string(),
                    at_ms,
                    metrics,
                };
                encoded = payload::to_bus(&report)?;
                Ok::<_, crate::executor::ExecError>(encoded.clone())
            })?;
            Ok::<_, crate::executor::ExecError>((seq, encoded))
        })
        .await;
        match appended {
            Ok(Ok((seq, payload))) => {
                let _ = events.send(ExecEvent::Report { seq, payload });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Storing a status report failed."),
            Err(e) => tracing::warn!(error = %e, "Status report task failed."),
        }
    }
}

/// Resolves when shutdown is requested or the handle is gone.
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A random gateway index, avoiding `avoid` when there is a choice.
fn pick_gateway(count: usize, avoid: Option<usize>) -> usize {
    match (count, avoid) {
        (0 | 1, _) => 0,
        (n, Some(bad)) if bad < n => {
            // Draw among the n - 1 others and skip over the bad one.
            let i = rand::random_range(0..n - 1);
            if i >= bad { i + 1 } else { i }
        }
        (n, _) => rand::random_range(0..n),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Why an established session failed (all of these lead to a reconnect).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    #[error("write timed out")]
    WriteTimeout,
    #[error("encode: {0}")]
    Encode(#[from] payload::PayloadError),
    #[error("bad route: {0}")]
    Route(#[from] messages::frame::RouteError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("outbox task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One live connection: the socket and its publish id counter.
struct Conn {
    ws: Ws,
    next_id: u64,
    /// Outbox sequences already sent in this session.
    sent: HashSet<u64>,
}

impl Conn {
    async fn send(&mut self, frame: Frame) -> Result<(), SessionError> {
        tokio::time::timeout(WRITE_TIMEOUT, self.ws.send(Message::Binary(frame.encode())))
            .await
            .map_err(|_| SessionError::WriteTimeout)??;
        Ok(())
    }

    async fn publish(&mut self, route: &str, body: Vec<u8>) -> Result<(), SessionError> {
        self.publish_traced(route, body, None).await
    }

    /// Publishes without trying to compress: tunnel bytes are mostly encrypted (SSH, TLS),
    /// and deflating 32 KiB that do not shrink would cost more CPU than the frame.
    async fn publish_plain(&mut self, route: &str, body: Vec<u8>) -> Result<(), SessionError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = Frame::new(FrameKind::Publish)
            .with_msg_id(id)
            .with_route(Route::new(route)?)
            .with_body(BodyCodec::MsgPack, body);
        self.send(frame).await
    }

    /// Publishes with a trace context in the frame header, so the gateway continues the
    /// task's trace instead of starting one.
    async fn publish_traced(
        &mut self,
        route: &str,
        body: Vec<u8>,
        trace: Option<TraceContext>,
    ) -> Result<(), SessionError> {
        let id = self.next_id;
        self.next_id += 1;
        // Large bodies (long output tails, replayed report batches) go compressed end to
        // end; the flag tells the scheduler to inflate.
        let (body, compressed) = match messages::compress::deflate_if_worth_it(&body) {
            Some(packed) => (packed, true),
            None => (body, false),
        };
        let mut frame = Frame::new(FrameKind::Publish)
            .with_msg_id(id)
            .with_route(Route::new(route)?)
            .with_body(BodyCodec::MsgPack, body)
            .with_trace(trace);
        frame.flags = frame.flags.with_compressed(compressed);
        self.send(frame).await
    }
}

/// How the frame handler wants the session to continue.
enum Next {
    Continue,
    End(SessionEnd),
}

impl Ctx {
    /// Connects to `url`, runs the session to its end and says how it ended.
    async fn session(&mut self, url: &str) -> SessionEnd {
        let token = self.credentials.current(now_ms() / 1000);
        let ws = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(url, &token, self.config.tls.client_config())) => match r {
                Err(_) => return lost(false, "connect timed out"),
                Ok(Err(end)) => return end,
                Ok(Ok(ws)) => ws,
            },
            () = wait_shutdown(&mut self.shutdown) => return SessionEnd::Shutdown,
        };
        let mut conn = Conn {
            ws,
            next_id: 1,
            sent: HashSet::new(),
        };
        let welcome =
            match tokio::time::timeout(WELCOME_TIMEOUT, read_welcome(&mut conn.ws, url)).await {
                Err(_) => return lost(false, "no welcome"),
                Ok(Err(end)) => return end,
                Ok(Ok(welcome)) => welcome,
            };
        tracing::info!(
            gateway = %welcome.gateway, socket_id = %welcome.socket_id, "Connected."
        );
        // Connected from the welcome until this function returns (or is dropped).
        let _connected = Connected::new(&self.metrics);
        let established = self.established(&mut conn, url, &welcome).await;
        // The streams belong to this connection: their remote connections close with it.
        self.tunnels.clear();
        match established {
            Ok(end) => {
                // Leave politely when the socket is still usable (shutdown, drain, refusal);
                // a lost one has nothing left to close.
                if !matches!(end, SessionEnd::Lost { .. }) {
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, conn.ws.close(None)).await;
                }
                end
            }
            Err(e) => lost(true, e.to_string()),
        }
    }

    /// Register, replay, then serve the connection until it ends.
    async fn established(
        &mut self,
        conn: &mut Conn,
        url: &str,
        welcome: &Welcome,
    ) -> Result<SessionEnd, SessionError> {
        // What is on disk now, so the scheduler pushes what is missing or drifted.
        let configs = {
            let configs = Arc::clone(&self.configs);
            tokio::task::spawn_blocking(move || configs.report()).await?
        };
        let register = Register {
            node_id: self.config.node_id.to_string(),
            hostname: self.hostname.clone(),
            version: self.config.reported_version.clone(),
            labels: self.config.labels.clone(),
            addresses: local_address(&conn.ws).into_iter().collect(),
            configs,
        };
        conn.publish(fleet::up::REGISTER, payload::to_bus(&register)?)
            .await?;
        self.replay(conn).await?;
        if self.config.upgrade_probe {
            // This process is a new binary on trial: registered is what the watchdog
            // waits for.
            let path = self.config.upgrade_state_path.clone();
            if let Err(e) =
                tokio::task::spawn_blocking(move || crate::upgrade::mark_probed(&path)).await?
            {
                tracing::error!(error = %e, "Cannot tell the upgrade watchdog this binary runs.");
            }
        }
        if let Some(status) = &self.status {
            conn.publish(fleet::up::STATUS, payload::to_bus(status)?)
                .await?;
        }

        let params = welcome.heartbeat;
        let grace = Duration::from_millis(u64::from(params.grace_ms)).max(MIN_GRACE);
        // A configured interval overrides the gateway's (and then acks are not followed).
        let fixed = self.config.heartbeat;
        let mut interval =
            fixed.unwrap_or_else(|| Duration::from_millis(u64::from(params.base_ms)));
        let mut last_beat = Instant::now();
        let mut dead_at: Option<Instant> = None;
        // An entry unacknowledged for `resend_after` is sent again on this connection. A
        // connection that stays up does not make every loss impossible: a result published
        // while no scheduler was subscribed (a failover's gap, a NATS node's loss) is gone,
        // and the agent would otherwise hold it until its next reconnect.
        let every = self.config.resend_after;
        let mut resend = tokio::time::interval_at(Instant::now() + every, every);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Entries pending at the previous check: still pending now means unacknowledged for
        // at least one interval.
        let mut unacked: HashSet<u64> = HashSet::new();
        // Streams of an earlier session are gone with its connection; frames they queued
        // would name streams the scheduler has closed.
        self.tunnels.clear();
        while self.tunnel_up.try_recv().is_ok() {}
        let tunnel_gap =
            Duration::from_secs(1).div_f64(f64::from(self.config.tunnel_frames_per_sec.max(1)));
        let mut tunnel_next = Instant::now();
        // When the unanswered heartbeat was written (its round trip is measured).
        let mut beat_sent: Option<Instant> = None;
        loop {
            // Beat at 90% of the interval so network delay does not make a beat late.
            let next_beat = last_beat + interval.mul_f64(0.9);
            let next = tokio::select! {
                () = tokio::time::sleep_until(next_beat) => {
                    conn.send(Frame::new(FrameKind::Heartbeat)).await?;
                    self.metrics.heartbeat_sent();
                    last_beat = Instant::now();
                    beat_sent = Some(last_beat);
                    if dead_at.is_none() {
                        dead_at = Some(last_beat + grace);
                    }
                    Next::Continue
                }
                () = sleep_until_opt(dead_at) => {
                    Next::End(lost(true, "no answer from the gateway after a heartbeat"))
                }
                msg = conn.ws.next() => {
                    match msg {
                        None => Next::End(lost(true, "connection closed")),
                        Some(Err(e)) => Next::End(lost(true, e.to_string())),
                        Some(Ok(Message::Binary(bytes))) => {
                            // Any frame proves the gateway is alive.
                            dead_at = None;
                            match Frame::decode(&bytes, &frame_limits()) {
                                Ok(frame) => {
                                    if frame.kind == FrameKind::HeartbeatAck
                                        && let Some(sent) = beat_sent.take()
                                    {
                                        self.metrics.heartbeat_rtt(sent.elapsed());
                                    }
                                    if frame.kind == FrameKind::HeartbeatAck && fixed.is_none() {
                                        if let Ok(ack) = payload::decode_body::<HeartbeatAck>(
                                            frame.flags.codec(),
                                            &frame.body,
                                        ) {
                                            interval = Duration::from_millis(
                                                u64::from(ack.next_interval_ms).max(100),
                                            );
                                        }
                                        Next::Continue
                                    } else {
                                        self.on_frame(conn, frame).await?
                                    }
                                }
                                // The two sides disagree on the protocol: reconnecting is
                                // the only recovery a client has.
                                Err(e) => Next::End(lost(true, format!("undecodable frame: {e}"))),
                            }
                        }
                        Some(Ok(Message::Close(close))) => Next::End(closed(url, close)),
                        Some(Ok(Message::Text(_))) => {
                            tracing::warn!("Ignoring a text message from the gateway.");
                            Next::Continue
                        }
                        Some(Ok(_)) => Next::Continue,
                    }
                }
                Some(event) = self.events.recv() => {
                    match event {
                        ExecEvent::Started(started) => {
                            let trace = self.traces.context(started.task_id);
                            let body = payload::to_bus(&started)?;
                            conn.publish_traced(fleet::up::STARTED, body, trace).await?;
                        }
                        ExecEvent::Finished { task_id, seq, payload } => {
                            if conn.sent.insert(seq) {
                                let trace = self.traces.context(task_id);
                                conn.publish_traced(fleet::up::RESULT, payload, trace).await?;
                                self.metrics.result_sent();
                            }
                            // The execution span ends once its result is on its way.
                            self.traces.finish(task_id);
                        }
                        ExecEvent::Report { seq, payload } => {
                            if conn.sent.insert(seq) {
                                let report: Report = payload::from_bus(&payload)?;
                                let batch = ReportBatch { reports: vec![report] };
                                conn.publish(fleet::up::REPORT, payload::to_bus(&batch)?).await?;
                            }
                        }
                        ExecEvent::ConfigAck { seq, payload } => {
                            if conn.sent.insert(seq) {
                                conn.publish(fleet::up::CONFIG_ACK, payload).await?;
                            }
                        }
                        ExecEvent::UpgradeResult { seq, payload } => {
                            if conn.sent.insert(seq) {
                                conn.publish(fleet::up::UPGRADE_RESULT, payload).await?;
                            }
                        }
                        ExecEvent::UpgradeInstalled => {
                            self.restart.store(true, Ordering::SeqCst);
                            return Ok(SessionEnd::Shutdown);
                        }
                        ExecEvent::Status(status) => {
                            conn.publish(fleet::up::STATUS, payload::to_bus(&status)?).await?;
                            self.status = Some(status);
                        }
                        ExecEvent::Output(chunk) => {
                            let output = self.executor.output();
                            output.taken();
                            if self.output_pace.allow() {
                                let trace = self.traces.context(chunk.task_id);
                                let body = payload::to_bus(&chunk)?;
                                conn.publish_traced(fleet::up::OUTPUT, body, trace).await?;
                            } else {
                                // Its sequence number stays unused: the receiver sees a gap.
                                output.not_sent();
                            }
                        }
                    }
                    Next::Continue
                }
                _ = resend.tick() => {
                    self.resend_unacked(conn, &mut unacked).await?;
                    Next::Continue
                }
                // Paced below the gateway's frame rate; heartbeats and results never wait
                // behind tunnel frames, which the windows bound.
                Some(up) = self.tunnel_up.recv(), if Instant::now() >= tunnel_next => {
                    match up {
                        crate::tunnel::Up::Frame { route, body } => {
                            conn.publish_plain(route, body).await?;
                            tunnel_next = Instant::now() + tunnel_gap;
                        }
                        crate::tunnel::Up::Ended(stream) => self.tunnels.ended(stream),
                    }
                    Next::Continue
                }
                () = tokio::time::sleep_until(tunnel_next), if Instant::now() < tunnel_next => Next::Continue,
                () = wait_shutdown(&mut self.shutdown) => Next::End(SessionEnd::Shutdown),
            };
            if let Next::End(end) = next {
                return Ok(end);
            }
        }
    }

    /// Sends every pending outbox entry (oldest first).
    async fn replay(&mut self, conn: &mut Conn) -> Result<(), SessionError> {
        let outbox = Arc::clone(&self.outbox);
        let entries: Vec<Entry> =
            tokio::task::spawn_blocking(move || outbox.pending(REPLAY_LIMIT)).await??;
        if !entries.is_empty() {
            tracing::info!(entries = entries.len(), "Replaying the outbox.");
        }
        self.send_entries(conn, entries).await
    }

    /// Sends again the entries that were already pending at the previous check (so have
    /// gone unacknowledged for at least one `resend_after`); remembers what is pending now.
    /// The scheduler ingests by message id, so a copy that arrives twice is acknowledged
    /// and not stored again.
    async fn resend_unacked(
        &mut self,
        conn: &mut Conn,
        unacked: &mut HashSet<u64>,
    ) -> Result<(), SessionError> {
        let outbox = Arc::clone(&self.outbox);
        let entries: Vec<Entry> =
            tokio::task::spawn_blocking(move || outbox.pending(REPLAY_LIMIT)).await??;
        let (stale, fresh): (Vec<Entry>, Vec<Entry>) =
            entries.into_iter().partition(|e| unacked.contains(&e.seq));
        // Entries not sent on this connection yet go out with their own event; only those
        // already sent are waited for.
        *unacked = fresh
            .iter()
            .chain(stale.iter())
            .filter(|e| conn.sent.contains(&e.seq))
            .map(|e| e.seq)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        tracing::info!(
            entries = stale.len(),
            after = ?self.config.resend_after,
            "Outbox entries unacknowledged; sending them again."
        );
        for e in &stale {
            conn.sent.remove(&e.seq);
        }
        self.send_entries(conn, stale).await
    }

    /// Sends outbox entries not yet sent on this connection (reports batched).
    async fn send_entries(
        &mut self,
        conn: &mut Conn,
        entries: Vec<Entry>,
    ) -> Result<(), SessionError> {
        let mut reports = Vec::new();
        for entry in entries {
            match entry.kind.as_str() {
                RESULT_KIND => {
                    if conn.sent.insert(entry.seq) {
                        // Our own entry: reading its task id finds the trace to continue.
                        let trace = payload::from_bus::<TaskResult>(&entry.payload)
                            .ok()
                            .and_then(|r| self.traces.context(r.task_id));
                        conn.publish_traced(fleet::up::RESULT, entry.payload, trace)
                            .await?;
                        self.metrics.result_sent();
                    }
                }
                REFUSED_KIND => {
                    if conn.sent.insert(entry.seq) {
                        conn.publish(fleet::up::REFUSED, entry.payload).await?;
                    }
                }
                CONFIG_ACK_KIND => {
                    if conn.sent.insert(entry.seq) {
                        conn.publish(fleet::up::CONFIG_ACK, entry.payload).await?;
                    }
                }
                UPGRADE_RESULT_KIND => {
                    if conn.sent.insert(entry.seq) {
                        conn.publish(fleet::up::UPGRADE_RESULT, entry.payload)
                            .await?;
                    }
                }
                REPORT_KIND => match payload::from_bus::<Report>(&entry.payload) {
                    Ok(report) => {
                        conn.sent.insert(entry.seq);
                        reports.push(report);
                    }
                    Err(e) => tracing::warn!(seq = entry.seq, error = %e, "Unreadable report."),
                },
                other => tracing::warn!(seq = entry.seq, kind = other, "Unknown outbox entry."),
            }
        }
        for chunk in reports.chunks(REPORTS_PER_BATCH) {
            let batch = ReportBatch {
                reports: chunk.to_vec(),
            };
            conn.publish(fleet::up::REPORT, payload::to_bus(&batch)?)
                .await?;
        }
        Ok(())
    }

    /// Handles one frame other than a heartbeat ack.
    async fn on_frame(&mut self, conn: &mut Conn, frame: Frame) -> Result<Next, SessionError> {
        match frame.kind {
            FrameKind::Push => {
                self.on_push(conn, &frame).await?;
                if frame.flags.receipt() && frame.msg_id != 0 {
                    conn.send(Frame::new(FrameKind::Ack).with_msg_id(frame.msg_id))
                        .await?;
                }
                Ok(Next::Continue)
            }
            FrameKind::Reconnect => {
                let delay = payload::decode_body::<Reconnect>(frame.flags.codec(), &frame.body)
                    .map(|r| Duration::from_millis(u64::from(r.delay_ms)))
                    .unwrap_or_default();
                Ok(Next::End(SessionEnd::Reconnect { delay }))
            }
            FrameKind::Error => {
                let body = payload::decode_body::<ErrorBody>(frame.flags.codec(), &frame.body);
                tracing::warn!(msg_id = frame.msg_id, error = ?body, "Gateway reported an error.");
                Ok(Next::Continue)
            }
            // Acks of our publishes only say the gateway took them; delivery is confirmed by
            // the scheduler's agent.ack push, so nothing to do.
            _ => Ok(Next::Continue),
        }
    }

    /// Admits a push (signature, node, route, lifetime, replay) and dispatches it by its
    /// route, or reports the refusal.
    async fn on_push(&mut self, conn: &mut Conn, frame: &Frame) -> Result<(), SessionError> {
        if frame.flags.compressed() {
            tracing::warn!(route = %frame.route, "Compressed pushes are not supported; ignored.");
            return Ok(());
        }
        let route = frame.route.as_str().to_owned();
        // Tunnel data, windows and closes are bound to their stream by the token its signed
        // open carried (ADR 0014), not signed one by one.
        if messages::tunnel::UNSIGNED_DOWN.contains(&route.as_str()) {
            self.tunnels.down(&route, &frame.body);
            return Ok(());
        }
        let now = now_ms();
        let admitted = {
            let (gate, outbox) = (Arc::clone(&self.gate), Arc::clone(&self.outbox));
            let (route, body) = (route.clone(), frame.body.clone());
            tokio::task::spawn_blocking(move || gate.admit(&outbox, &route, &body, now)).await?
        };
        let envelope = match admitted {
            Ok(envelope) => envelope,
            Err(GateError::Refused(refusal)) => {
                return self.refuse(conn, &route, &frame.body, &refusal, now).await;
            }
            // Not acted on and not remembered: the scheduler retries once the attempt expires.
            Err(GateError::Outbox(e)) => {
                tracing::error!(%route, error = %e, "Cannot record a command id; not acting on it.");
                return Ok(());
            }
        };
        let body = &envelope.body[..];
        match route.as_str() {
            fleet::down::TASK => match payload::from_bus::<Task>(body) {
                Ok(task) => {
                    self.traces
                        .start(task.task_id, frame.trace.as_ref(), frame.msg_id);
                    tracing::info!(
                        task_id = task.task_id,
                        attempt = task.attempt,
                        command_id = %envelope.id,
                        trace_id = %self.traces.trace_id(task.task_id),
                        "Task received."
                    );
                    self.executor.start(task);
                }
                Err(e) => {
                    let refusal = Refusal::Body(e.to_string());
                    return self.refuse(conn, &route, &frame.body, &refusal, now).await;
                }
            },
            fleet::down::CONFIG => match payload::from_bus::<fleet::ConfigPush>(body) {
                Ok(push) => {
                    // A name that is not a plain file name could point anywhere on the
                    // machine: refused and reported like a forgery, never written.
                    if let Err(e) = fleet::check_config_name(&push.name) {
                        let refusal = Refusal::Body(format!("unsafe config name: {e}"));
                        return self.refuse(conn, &route, &frame.body, &refusal, now).await;
                    }
                    tracing::info!(
                        name = %push.name,
                        version = push.version,
                        command_id = %envelope.id,
                        "Config received."
                    );
                    if self.config_tx.send(push).is_err() {
                        tracing::error!("The config worker is gone; config not applied.");
                    }
                }
                Err(e) => {
                    let refusal = Refusal::Body(e.to_string());
                    return self.refuse(conn, &route, &frame.body, &refusal, now).await;
                }
            },
            fleet::down::UPGRADE => match payload::from_bus::<fleet::UpgradeManifest>(body) {
                Ok(manifest) => {
                    tracing::info!(
                        upgrade_id = manifest.upgrade_id,
                        version = %manifest.version,
                        sha256 = %manifest.sha256,
                        command_id = %envelope.id,
                        "Upgrade received."
                    );
                    let upgrader = self.upgrader.clone();
                    if upgrader.begin() {
                        let token = self.credentials.current(now_ms() / 1000);
                        tokio::spawn(upgrader.run(manifest, token));
                    } else {
                        tokio::spawn(upgrader.busy(manifest));
                    }
                }
                Err(e) => {
                    let refusal = Refusal::Body(e.to_string());
                    return self.refuse(conn, &route, &frame.body, &refusal, now).await;
                }
            },
            messages::tunnel::OPEN => match payload::from_bus::<messages::tunnel::Open>(body) {
                Ok(open) => self.tunnels.open(open),
                Err(e) => {
                    let refusal = Refusal::Body(e.to_string());
                    return self.refuse(conn, &route, &frame.body, &refusal, now).await;
                }
            },
            fleet::down::CANCEL => match payload::from_bus::<Cancel>(body) {
                Ok(cancel) => {
                    let found = self.executor.cancel(cancel.task_id);
                    tracing::info!(task_id = cancel.task_id, found, "Cancel received.");
                }
                Err(e) => tracing::warn!(error = %e, "Undecodable cancel."),
            },
            fleet::down::ACK => match payload::from_bus::<Ack>(body) {
                Ok(ack) => {
                    self.metrics.ack_received();
                    self.on_ack(&ack);
                }
                Err(e) => tracing::warn!(error = %e, "Undecodable ack."),
            },
            fleet::down::CREDENTIAL => match payload::from_bus::<fleet::Credential>(body) {
                Ok(credential) => {
                    let credentials = Arc::clone(&self.credentials);
                    let token = credential.token.clone();
                    let renewed =
                        tokio::task::spawn_blocking(move || credentials.renew(&credential.token))
                            .await?;
                    match renewed {
                        Ok(expires_at) => {
                            self.metrics.credential_renewed();
                            tracing::info!(expires_at, "Credential renewed.");
                            // The session lives on with the new token instead of being
                            // closed (4502) when the one it was opened with expires.
                            let id = conn.next_id;
                            conn.next_id += 1;
                            conn.send(
                                Frame::new(FrameKind::Refresh)
                                    .with_msg_id(id)
                                    .with_body(BodyCodec::Raw, token.into_bytes()),
                            )
                            .await?;
                        }
                        Err(e) => tracing::error!(error = %e, "Renewed credential refused."),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Undecodable credential."),
            },
            other => tracing::debug!(route = other, "Push on an unknown route ignored."),
        }
        Ok(())
    }

    /// Counts, logs and (within the budget) reports a refused command.
    async fn refuse(
        &mut self,
        conn: &mut Conn,
        route: &str,
        body: &[u8],
        refusal: &Refusal,
        now: u64,
    ) -> Result<(), SessionError> {
        self.metrics.command_refused();
        tracing::warn!(%route, reason = refusal.as_str(), detail = %refusal, "Command refused.");
        let (left, since) = &mut self.refusal_budget;
        if since.elapsed() >= Duration::from_secs(60) {
            *left = REFUSAL_REPORTS_PER_MINUTE;
            *since = Instant::now();
        }
        if *left == 0 {
            return Ok(());
        }
        *left -= 1;
        let report = refusal_report(route, body, refusal, now);
        let outbox = Arc::clone(&self.outbox);
        let (seq, bytes) = tokio::task::spawn_blocking(move || {
            let mut written = Vec::new();
            let seq = outbox.append_with(REFUSED_KIND, |id| {
                let mut report = report;
                report.message_id = id.to_string();
                written = payload::to_bus(&report).map_err(RefuseError::Encode)?;
                Ok::<_, RefuseError>(written.clone())
            })?;
            Ok::<_, RefuseError>((seq, written))
        })
        .await?
        .map_err(|e| match e {
            RefuseError::Outbox(e) => SessionError::Outbox(e),
            RefuseError::Encode(e) => SessionError::Encode(e),
        })?;
        if conn.sent.insert(seq) {
            conn.publish(fleet::up::REFUSED, bytes).await?;
        }
        Ok(())
    }

    /// Deletes the acknowledged entries, off the loop: each delete is an fsync, and a large
    /// ack must not delay heartbeats.
    fn on_ack(&mut self, ack: &Ack) {
        let instance = self.outbox.instance_id();
        let seqs: Vec<u64> = ack
            .message_ids
            .iter()
            .filter_map(|id| MessageId::parse(id))
            // Ids of another outbox file (a reinstalled agent) name nothing here.
            .filter(|id| id.instance == instance)
            .map(|id| id.seq)
            .collect();
        if seqs.is_empty() {
            return;
        }
        // Reap finished deletions; the rest are awaited when the agent stops.
        while self.ack_tasks.try_join_next().is_some() {}
        let outbox = Arc::clone(&self.outbox);
        self.ack_tasks.spawn_blocking(move || {
            for seq in seqs {
                if let Err(e) = outbox.ack(seq) {
                    tracing::error!(seq, error = %e, "Cannot delete an acked outbox entry.");
                }
            }
        });
    }
}

/// Marks the agent connected while it lives: `agent_connected` is 1 from the welcome until
/// the session ends, on every path out of it.
struct Connected(Arc<AgentMetrics>);

impl Connected {
    fn new(metrics: &Arc<AgentMetrics>) -> Self {
        metrics.session_started();
        Connected(Arc::clone(metrics))
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.session_ended();
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lost(welcomed: bool, reason: impl Into<String>) -> SessionEnd {
    SessionEnd::Lost {
        welcomed,
        reason: reason.into(),
    }
}

/// Maps a close frame to how the session ends: 4502 reconnects with the newest credential,
/// 4505 (revoked) waits at the backoff cap, the rest of 4500-4999 is fatal, anything else
/// reconnects.
fn closed(url: &str, close: Option<CloseFrame>) -> SessionEnd {
    let Some(close) = close else {
        return lost(true, "closed without a code");
    };
    let code = u16::from(close.code);
    if code == CloseCode::Unauthorized.code() {
        return lost(true, "credential expired; reconnecting with the newest");
    }
    if code == CloseCode::Revoked.code() {
        return SessionEnd::Locked {
            reason: format!("gateway {url}: this node is revoked ({code})"),
        };
    }
    if (4500..5000).contains(&code) {
        SessionEnd::Fatal(RunError::Refused {
            url: url.to_owned(),
            code,
            reason: close.reason.to_string(),
        })
    } else {
        lost(true, format!("closed with {code} ({})", close.reason))
    }
}

fn frame_limits() -> Limits {
    Limits {
        max_route_len: messages::frame::MAX_ROUTE_LEN,
        max_body_len: MAX_MESSAGE,
    }
}

/// The local IP of the connection, reported as the node's address.
fn local_address(ws: &Ws) -> Option<String> {
    match ws.get_ref() {
        MaybeTlsStream::Plain(Transport::Tcp(tcp)) => {
            tcp.local_addr().ok().map(|a| a.ip().to_string())
        }
        _ => None,
    }
}

/// Opens the WebSocket with the token in the `Authorization` header.
async fn connect(
    url: &str,
    token: &Token,
    tls: Option<&Arc<servicekit::tls::ClientConfig>>,
) -> Result<Ws, SessionEnd> {
    let mut request = url
        .into_client_request()
        .map_err(|e| lost(false, format!("bad gateway URL {url}: {e}")))?;
    let value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        .map_err(|_| lost(false, "token is not a valid header value"))?;
    request.headers_mut().insert("authorization", value);
    // Small buffers: an agent holds one quiet connection, and edge machines are small.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE + 1024));
    let connector = tls.map(|c| tokio_tungstenite::Connector::Rustls(Arc::clone(c)));
    // Through a relay (ADR 0015) only the connection goes elsewhere; TLS and the upgrade
    // still name the gateway, so the relay carries bytes it cannot read.
    let via = crate::config::via_of(url).map_err(|why| lost(false, format!("{url} {why}")))?;
    let stream = match via {
        Some(Via::Tcp(addr)) => TcpStream::connect(addr.as_str())
            .await
            .map(Transport::Tcp)
            .map_err(|e| lost(false, format!("relay {addr} unreachable: {e}")))?,
        Some(Via::Unix(path)) => tokio::net::UnixStream::connect(&path)
            .await
            .map(Transport::Unix)
            .map_err(|e| {
                let via = Via::Unix(path);
                lost(false, format!("relay {via} unreachable: {e}"))
            })?,
        // Dialled here rather than by tungstenite so that direct, TCP-relayed and
        // unix-relayed connections are one stream type for the session.
        None => {
            let uri = request.uri();
            let host = uri.host().unwrap_or_default();
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .to_owned();
            let tls = uri
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("wss"));
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            TcpStream::connect((host.as_str(), port))
                .await
                .map(Transport::Tcp)
                .map_err(|e| lost(false, connect_error(&tungstenite::Error::Io(e))))?
        }
    };
    if let Transport::Tcp(tcp) = &stream {
        let _ = tcp.set_nodelay(true);
    }
    let handshake =
        tokio_tungstenite::client_async_tls_with_config(request, stream, Some(config), connector)
            .await;
    match handshake {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            if status == 401 || status == 403 {
                let why = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                Err(SessionEnd::Locked {
                    reason: format!(
                        "gateway {url} rejected the credential (HTTP {status}: {why}); \
                         enrol the node again or check its token"
                    ),
                })
            } else {
                Err(lost(false, format!("handshake refused with HTTP {status}")))
            }
        }
        Err(e) => Err(lost(false, connect_error(&e))),
    }
}

/// A connect failure in words, naming the cause and the setting to check when the TLS
/// handshake failed.
fn connect_error(e: &tungstenite::Error) -> String {
    use servicekit::tls::TlsFailure;
    let Some(failure) = TlsFailure::find(e) else {
        return e.to_string();
    };
    let hint = match failure {
        TlsFailure::UnknownIssuer => "; check tls_ca_file",
        TlsFailure::PinMismatch { .. } => "; check tls_pin_sha256",
        TlsFailure::NameMismatch { .. } => "; the gateway URL's host must be in the certificate",
        _ => "",
    };
    format!("TLS handshake failed: {failure}{hint}")
}

/// Reads until the welcome (the first frame a gateway sends).
async fn read_welcome(ws: &mut Ws, url: &str) -> Result<Welcome, SessionEnd> {
    loop {
        match ws.next().await {
            None => return Err(lost(false, "closed before the welcome")),
            Some(Err(e)) => return Err(lost(false, e.to_string())),
            Some(Ok(Message::Binary(bytes))) => {
                let frame = Frame::decode(&bytes, &frame_limits())
                    .map_err(|e| lost(false, format!("undecodable frame: {e}")))?;
                if frame.kind != FrameKind::Welcome {
                    return Err(lost(
                        false,
                        format!("expected a welcome, got {}", frame.kind),
                    ));
                }
                return payload::decode_body(frame.flags.codec(), &frame.body)
                    .map_err(|e| lost(false, format!("undecodable welcome: {e}")));
            }
            Some(Ok(Message::Close(close))) => {
                return Err(match closed(url, close) {
                    SessionEnd::Lost { reason, .. } => lost(false, reason),
                    other => other,
                });
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

    #[test]
    fn picks_another_gateway_after_a_failure() {
        assert_eq!(pick_gateway(1, Some(0)), 0);
        for _ in 0..200 {
            assert_ne!(pick_gateway(2, Some(0)), 0);
            let i = pick_gateway(3, Some(1));
            assert!(i == 0 || i == 2);
            assert!(pick_gateway(3, None) < 3);
        }
    }

    #[test]
    fn only_high_close_codes_are_fatal() {
        let frame = |code: u16| {
            Some(CloseFrame {
                code: WsCloseCode::from(code),
                reason: "x".into(),
            })
        };
        assert!(matches!(closed("u", frame(4000)), SessionEnd::Lost { .. }));
        assert!(matches!(closed("u", frame(1006)), SessionEnd::Lost { .. }));
        assert!(matches!(closed("u", None), SessionEnd::Lost { .. }));
        // An expired credential reconnects (with the newest one); a revoked node waits.
        assert!(matches!(closed("u", frame(4502)), SessionEnd::Lost { .. }));
        assert!(matches!(
            closed("u", frame(4505)),
            SessionEnd::Locked { .. }
        ));
        match closed("u", frame(4503)) {
            SessionEnd::Fatal(e) => assert_eq!(e.exit_code(), 76),
            other => panic!("{other:?}"),
        }
    }
}
