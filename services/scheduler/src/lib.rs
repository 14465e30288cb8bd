//! scheduler: the fleet control plane. It consumes agent traffic from the bus (register,
//! heartbeat batches, status, reports, task progress and results), keeps the agent registry
//! and the tasks in one redb file, pushes tasks, cancels and acknowledgements back to the
//! agents through the gateways, and offers operators an HTTP API.
//!
//! - [`store`]: the durable state, as a synchronous API (called on blocking threads).
//! - [`bus`]: the NATS consumers, the pushes to agents and the liveness/deadline sweep.
//! - [`config`]: flags and environment variables.
//! - [`configs`]: versioned config documents on the bus (push, ack, convergence at
//!   register); not to be confused with [`config`].
//! - [`output`]: the recent output of running commands, in memory.
//! - [`follow`]: the live output stream (Server-Sent Events) of one task.
//! - [`lease`]: the leader lease; only the instance holding it is active.
//! - [`trust`]: command and agent-token keys, credential renewal, revocation, refusals.
//! - [`auth`]: named, scoped API keys; [`audit`]: the append-only log of who changed what.
//! - [`schedule`]: recurring tasks from cron expressions, fired by the active instance.
//! - [`rollout`]: staged rollouts (pilot, gray, full in batches), driven by the active
//!   instance.
//! - [`upgrades`]: signed agent upgrades on the bus (push, reports, `online` at register);
//!   [`artifacts`]: the uploaded binaries on disk, by SHA-256.
//!
//! - [`tunnel`]: TCP tunnels to agents' ports (the registry of streams; the operator's
//!   WebSocket is served by the HTTP module).
//! - [`console`]: the operator web console at `/console` (server-rendered pages, cookie
//!   sessions, live updates over Server-Sent Events); [`gateways`]: the gateway replicas'
//!   stats it shows.
//!
//! [`run`] is the whole service; [`spawn`] runs it on its own thread for tests.

mod artifacts;
mod audit;
pub mod auth;
mod bus;
mod config;
mod configs;
pub mod console;
mod follow;
mod gateways;
mod http;
pub mod lease;
mod output;
mod rollout;
mod schedule;
pub mod store;
pub mod trust;
mod tunnel;
mod upgrades;

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use messages::{SocketId, UserId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub use config::{Args, Config, ConfigError};

use crate::store::{Store, StoreError};
use servicekit::durable::DbError;

/// How long a runtime's tasks get to finish when it shuts down.
const RUNTIME_GRACE: Duration = Duration::from_secs(5);

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding, runtime creation, serving.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// No NATS client could be made.
    #[error("nats: {0}")]
    Nats(#[from] servicekit::nats::ConnectError),
    /// The bus consumers could not be started.
    #[error("nats: {0}")]
    Bus(#[from] bus::BusError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This instance was active and lost the leader lease; it stopped so that a supervisor
    /// restarts it (as a standby, until the lease is free again).
    #[error("lost the leader lease; stopped to let a supervisor restart this instance")]
    LeaseLost,
}

/// Counters of the service, exposed at `/metrics` (OpenMetrics, `prometheus-client`, under
/// the `scheduler` prefix).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Register messages handled.
    pub registers: Counter,
    /// Agent state changes announced.
    pub state_changes: Counter,
    /// Tasks created over the API.
    pub tasks_created: Counter,
    /// Task attempts dispatched to agents.
    pub dispatches: Counter,
    /// Results ingested for the first time.
    pub results: Counter,
    /// Results that were replays (acknowledged again, not counted).
    pub duplicate_results: Counter,
    /// Reports ingested.
    pub reports: Counter,
    /// Pushes published to agents (tasks, cancels, acks).
    pub pushes: Counter,
    /// Bus messages that could not be handled.
    pub bus_errors: Counter,
    /// Commands agents reported refusing (forged, expired, replayed, another node's).
    pub commands_refused: Counter,
    /// Agent credentials issued or renewed.
    pub credentials_issued: Counter,
    /// Messages dropped because their node is revoked.
    pub revoked_dropped: Counter,
    /// Schedule periods that created a task.
    pub schedule_fires: Counter,
    /// Schedule periods skipped because the previous run was unfinished.
    pub schedule_skips: Counter,
    /// Config documents pushed to agents.
    pub config_pushes: Counter,
    /// Config acks ingested (applied or failed).
    pub config_acks: Counter,
    /// Rollout batches started.
    pub rollout_batches: Counter,
    /// Rollouts halted by their failure threshold or a batch that could not start.
    pub rollout_halts: Counter,
    /// Upgrade manifests pushed to agents.
    pub upgrade_pushes: Counter,
    /// Upgrade reports from agents ingested.
    pub upgrade_results: Counter,
    /// Per-hop latency of agent traffic, from the messages' `ws-hop` stamps.
    pub hops: servicekit::hops::HopLatency,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything under the `scheduler` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("scheduler");
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let registers = counter("registers", "Register messages handled.");
        let state_changes = counter("state_changes", "Agent state changes announced.");
        let tasks_created = counter("tasks_created", "Tasks created.");
        let dispatches = counter("dispatches", "Task attempts dispatched.");
        let results = counter("results", "Results ingested.");
        let duplicate_results =
            counter("duplicate_results", "Replayed results acknowledged again.");
        let reports = counter("reports", "Reports ingested.");
        let pushes = counter("pushes", "Pushes published to agents.");
        let bus_errors = counter("bus_errors", "Bus messages that failed.");
        let commands_refused = counter("commands_refused", "Commands agents reported refusing.");
        let credentials_issued =
            counter("credentials_issued", "Agent credentials issued or renewed.");
        let revoked_dropped = counter("revoked_dropped", "Messages from revoked nodes dropped.");
        let schedule_fires = counter("schedule_fires", "Schedule periods that created a task.");
        let schedule_skips = counter(
            "schedule_skips",
            "Schedule periods skipped while the previous run was unfinished.",
        );
        let config_pushes = counter("config_pushes", "Config documents pushed to agents.");
        let config_acks = counter("config_acks", "Config acks from agents ingested.");
        let rollout_batches = counter("rollout_batches", "Rollout batches started.");
        let rollout_halts = counter(
            "rollout_halts",
            "Rollouts halted by a failure threshold or a batch that could not start.",
        );
        let upgrade_pushes = counter("upgrade_pushes", "Upgrade manifests pushed to agents.");
        let upgrade_results = counter("upgrade_results", "Upgrade reports from agents ingested.");
        let hops = servicekit::hops::HopLatency::register(&mut registry);
        Metrics {
            registry,
            registers,
            state_changes,
            tasks_created,
            dispatches,
            results,
            duplicate_results,
            reports,
            pushes,
            bus_errors,
            commands_refused,
            credentials_issued,
            revoked_dropped,
            schedule_fires,
            schedule_skips,
            config_pushes,
            config_acks,
            rollout_batches,
            rollout_halts,
            upgrade_pushes,
            upgrade_results,
            hops,
        }
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        servicekit::http::encode_metrics(&self.registry)
    }
}

/// State shared by HTTP handlers and bus consumers.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: Config,
    /// NATS client (its connection lives on the service's own runtime).
    pub client: async_nats::Client,
    /// The durable state.
    pub store: Arc<Store>,
    /// Counters.
    pub metrics: Metrics,
    /// Agent sockets the gateways told us about, so heartbeat batches (which name sockets)
    /// can be mapped to nodes. Memory only: after a restart the scheduler asks the gateways
    /// to re-announce their sessions.
    pub sockets: Mutex<HashMap<SocketId, UserId>>,
    /// The relay each relayed agent socket arrived through (the gateway's `via`, ADR 0015).
    pub vias: Mutex<HashMap<SocketId, UserId>>,
    /// Streamed command output (best effort, memory only).
    pub output: output::OutputLog,
    /// Clients following output right now (see [`follow`]).
    pub followers: std::sync::atomic::AtomicUsize,
    /// Revoked nodes (mirrors the store) and when each node's credential was last renewed.
    pub trust: trust::Live,
    /// Open tunnel streams (memory only).
    pub tunnels: tunnel::Tunnels,
    /// The gateway replicas' latest stats, for the console (memory only).
    pub gateways: gateways::Tier,
    /// The operator console's sessions and login throttle (memory only).
    pub console: console::ConsoleState,
}

impl Shared {
    /// Remembers that `socket` belongs to `node`.
    pub fn remember_socket(&self, socket: SocketId, node: UserId) {
        if let Ok(mut map) = self.sockets.lock() {
            map.insert(socket, node);
        }
    }

    /// Remembers (or forgets, with `None`) the relay `socket` arrived through.
    pub fn remember_via(&self, socket: SocketId, via: Option<UserId>) {
        if let Ok(mut map) = self.vias.lock() {
            match via {
                Some(via) => map.insert(socket, via),
                None => map.remove(&socket),
            };
        }
    }

    /// The relay `socket` arrived through, if it was relayed.
    pub fn via_of(&self, socket: SocketId) -> Option<UserId> {
        self.vias.lock().ok()?.get(&socket).cloned()
    }

    /// Forgets `socket`; returns whether `node` still has another known socket.
    pub fn forget_socket(&self, socket: SocketId, node: &UserId) -> bool {
        match self.sockets.lock() {
            Ok(mut map) => {
                map.remove(&socket);
                map.values().any(|n| n == node)
            }
            Err(_) => false,
        }
    }

    /// The node a socket belongs to, if known.
    pub fn node_of(&self, socket: SocketId) -> Option<UserId> {
        self.sockets.lock().ok()?.get(&socket).cloned()
    }
}

/// Runs the scheduler with its HTTP API on `listener` until `shutdown` completes. Must be
/// called inside an actix system.
///
/// The instance first stands by: it serves only `/healthz` (200) and a `/readyz` saying
/// `standby` (503), and waits for the leader lease ([`lease`]). Only once it holds the
/// lease does it open the redb file (redb locks it, and a standby on the same volume must
/// not hold it), subscribe to the bus, start the sweep and serve the API.
///
/// A graceful stop closes the store first and then deletes the lease, so a standby takes
/// over at once. Losing the lease while active (no refresh succeeded within the TTL, or
/// another instance took it) stops consuming, dispatching and serving, and returns
/// [`Error::LeaseLost`]: the process exits and its supervisor restarts it as a standby.
/// That is simpler to get right than demoting in place, where every task spawned while
/// active would have to be found and stopped.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    // The lease has its own runtime and NATS connection: it is released after the bus
    // runtime (whose tasks hold the store) has shut down, and its refreshes never queue
    // behind bus traffic.
    let lease_rt = servicekit::nats::runtime("scheduler-lease")?;
    let result = lead(&config, &lease_rt, listener, std::pin::pin!(shutdown)).await;
    servicekit::nats::shutdown_runtime(lease_rt, RUNTIME_GRACE).await;
    tracing::info!("scheduler stopped.");
    result
}

/// Stands by until the lease is ours (or `shutdown`), then runs the active phase and
/// releases the lease afterwards unless it was lost.
async fn lead(
    config: &Config,
    lease_rt: &tokio::runtime::Runtime,
    listener: TcpListener,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), Error> {
    let url = config.nats_url.clone();
    let client = lease_rt
        .spawn(async move { servicekit::nats::connect(&url, "scheduler-lease").await })
        .await
        .map_err(join_error)??;
    let mut standby = Some(serve_standby(
        listener.try_clone()?,
        &config.instance,
        config.tls.as_deref(),
    )?);
    tracing::info!(instance = %config.instance, "scheduler standing by for the leader lease.");
    let lease_cfg = lease::LeaseConfig {
        bucket: config.lease_bucket.clone(),
        ttl: config.lease_ttl,
        instance: config.instance.clone(),
        replicas: config.lease_replicas,
    };
    let mut acquiring = lease_rt.spawn(lease::acquire(
        async_nats::jetstream::new(client),
        lease_cfg,
    ));
    let lease = tokio::select! {
        () = &mut shutdown => {
            acquiring.abort();
            if let Some(s) = standby.take() {
                s.stop(true).await;
            }
            return Ok(());
        }
        lease = &mut acquiring => lease.map_err(join_error)?,
    };
    let mut keeper = lease::Keeper::spawn(lease_rt.handle(), lease);
    let bus_rt = servicekit::nats::runtime("scheduler-nats")?;
    let result = active(
        config,
        listener,
        &mut standby,
        &bus_rt,
        &mut keeper,
        shutdown,
    )
    .await;
    if let Some(s) = standby.take() {
        s.stop(true).await;
    }
    // The consumers hold the store; wait (off the async threads, where a runtime may not
    // block) until they are dropped, so the redb file is closed before the lease is
    // released and the next active instance can open it at once.
    servicekit::nats::shutdown_runtime(bus_rt, RUNTIME_GRACE).await;
    if !matches!(result, Err(Error::LeaseLost)) {
        keeper.release().await;
    }
    result
}

/// The active phase: open the store, start the bus consumers and the sweep, serve the API
/// until `shutdown` (`Ok`) or the loss of the lease ([`Error::LeaseLost`]).
async fn active(
    config: &Config,
    listener: TcpListener,
    standby: &mut Option<Running>,
    runtime: &tokio::runtime::Runtime,
    keeper: &mut lease::Keeper,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), Error> {
    let store = tokio::select! {
        () = &mut shutdown => return Ok(()),
        () = keeper.lost() => return Err(Error::LeaseLost),
        store = open_store(config.db_path.clone(), config.lease_ttl) => store?,
    };
    let store = Arc::new(store);
    // The NATS connection and the consumers live on their own runtime (docs/dependencies.md, trap 5).
    let setup_config = config.clone();
    let shared = runtime
        .spawn(async move { connect(setup_config, store).await })
        .await
        .map_err(join_error)??;
    bus::start(runtime, &shared).await?;
    // Schedules fire only here, in the active phase, on the bus runtime: it is shut down
    // (and the store closed) before the lease is released.
    runtime.spawn(schedule::run(Arc::downgrade(&shared)));
    runtime.spawn(rollout::run(Arc::downgrade(&shared)));
    if let Some(s) = standby.take() {
        s.stop(false).await;
    }

    let data = web::Data::new(Arc::clone(&shared));
    let max = config.max_body_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(max)
                    .error_handler(|e, _| servicekit::http::json_error(e)),
            )
            .configure(http::routes)
            .configure(console::routes)
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5);
    let server = match &config.tls {
        Some(tls) => server.listen_rustls_0_23(listener, (**tls).clone())?,
        None => server.listen(listener)?,
    }
    .run();
    let server = Running::start(server);
    tracing::info!(instance = %config.instance, "scheduler active.");
    let outcome = tokio::select! {
        () = &mut shutdown => Ok(()),
        () = keeper.lost() => {
            tracing::error!("Lost the leader lease; stopping so a supervisor restarts this instance.");
            Err(Error::LeaseLost)
        }
    };
    // After a loss, requests in flight are cut short: another instance may be active.
    server.stop(outcome.is_ok()).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), shared.client.flush()).await;
    outcome
}

/// An HTTP server running on the actix system.
struct Running {
    handle: actix_web::dev::ServerHandle,
    task: actix_web::rt::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    fn start(server: actix_web::dev::Server) -> Self {
        Running {
            handle: server.handle(),
            task: actix_web::rt::spawn(server),
        }
    }

    async fn stop(self, graceful: bool) {
        self.handle.stop(graceful).await;
        let _ = self.task.await;
    }
}

/// The standby's HTTP server, on a duplicate of the listening socket: when it stops, the
/// socket stays open and connections wait in its backlog for the active server. It speaks
/// TLS when the active server will, since clients cannot tell the two apart.
fn serve_standby(
    listener: TcpListener,
    instance: &str,
    tls: Option<&servicekit::tls::ServerConfig>,
) -> Result<Running, Error> {
    let instance = web::Data::new(instance.to_owned());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(instance.clone())
            .configure(http::standby_routes)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    let server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls.clone())?,
        None => server.listen(listener)?,
    }
    .run();
    Ok(Running::start(server))
}

/// Opens the store, retrying for up to `patience` while another process still has the
/// file open: a previous active instance that lost or released the lease may still be
/// closing it.
async fn open_store(path: PathBuf, patience: Duration) -> Result<Store, Error> {
    let give_up = tokio::time::Instant::now() + patience;
    loop {
        let p = path.clone();
        // Opening may repair the file after a crash: keep it off the async threads.
        match tokio::task::spawn_blocking(move || Store::open(p))
            .await
            .map_err(join_error)?
        {
            Ok(store) => return Ok(store),
            Err(StoreError::Db(DbError::Open { source, .. }))
                if matches!(*source, redb::DatabaseError::DatabaseAlreadyOpen)
                    && tokio::time::Instant::now() < give_up =>
            {
                tracing::debug!("Store still open elsewhere; retrying.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Io(std::io::Error::other(e))
}

async fn connect(config: Config, store: Arc<Store>) -> Result<Arc<Shared>, Error> {
    let client = servicekit::nats::connect(&config.nats_url, "scheduler").await?;
    Ok(Arc::new(Shared {
        config,
        client,
        store: Arc::clone(&store),
        metrics: Metrics::default(),
        sockets: Mutex::new(HashMap::new()),
        vias: Mutex::new(HashMap::new()),
        output: output::OutputLog::default(),
        followers: std::sync::atomic::AtomicUsize::new(0),
        trust: trust::Live::load(&store)?,
        tunnels: tunnel::Tunnels::default(),
        gateways: gateways::Tier::default(),
        console: console::ConsoleState::default(),
    }))
}

/// A scheduler running on its own thread and actix system (tests, embedding).
pub type Handle = servicekit::Handle<Error>;

/// Starts the service on its own thread and actix system.
pub fn spawn(config: Config, listener: TcpListener) -> Result<Handle, Error> {
    Ok(servicekit::spawn(
        "scheduler",
        listener,
        move |listener, stop| {
            run(config, listener, async {
                let _ = stop.await;
            })
        },
    )?)
}
