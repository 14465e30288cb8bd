//! scheduler: the fleet control plane. It consumes agent traffic from the bus (register,
//! heartbeat batches, status, reports, task progress and results), keeps the agent registry
//! and the tasks in one redb file, pushes tasks, cancels and acknowledgements back to the
//! agents through the gateways, and offers operators an HTTP API.
//!
//! - [`store`]: the durable state, as a synchronous API (called on blocking threads).
//! - [`bus`]: the NATS consumers, the pushes to agents and the liveness/deadline sweep.
//! - [`config`]: flags and environment variables.
//! - [`output`]: the recent output of running commands, in memory.
//!
//! [`run`] is the whole service; [`spawn`] runs it on its own thread for tests.

pub mod bus;
pub mod config;
mod http;
pub mod output;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use messages::{SocketId, UserId};

pub use config::{Args, Config, ConfigError};

use crate::store::{Store, StoreError};

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding, runtime creation, serving.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// NATS could not be set up.
    #[error("nats: {0}")]
    Nats(String),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters of the service, exposed at `/metrics` in the Prometheus text format.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Register messages handled.
    pub registers: AtomicU64,
    /// Agent state changes announced.
    pub state_changes: AtomicU64,
    /// Tasks created over the API.
    pub tasks_created: AtomicU64,
    /// Task attempts dispatched to agents.
    pub dispatches: AtomicU64,
    /// Results ingested for the first time.
    pub results: AtomicU64,
    /// Results that were replays (acknowledged again, not counted).
    pub duplicate_results: AtomicU64,
    /// Reports ingested.
    pub reports: AtomicU64,
    /// Pushes published to agents (tasks, cancels, acks).
    pub pushes: AtomicU64,
    /// Bus messages that could not be handled.
    pub bus_errors: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let rows: [(&str, &str, &AtomicU64); 9] = [
            ("registers", "Register messages handled", &self.registers),
            (
                "state_changes",
                "Agent state changes announced",
                &self.state_changes,
            ),
            ("tasks_created", "Tasks created", &self.tasks_created),
            ("dispatches", "Task attempts dispatched", &self.dispatches),
            ("results", "Results ingested", &self.results),
            (
                "duplicate_results",
                "Replayed results acknowledged again",
                &self.duplicate_results,
            ),
            ("reports", "Reports ingested", &self.reports),
            ("pushes", "Pushes published to agents", &self.pushes),
            ("bus_errors", "Bus messages that failed", &self.bus_errors),
        ];
        let mut out = String::new();
        for (name, help, value) in rows {
            let v = value.load(Ordering::Relaxed);
            out.push_str(&format!(
                "# HELP scheduler_{name} {help}.\n# TYPE scheduler_{name} counter\nscheduler_{name}_total {v}\n"
            ));
        }
        out.push_str("# EOF\n");
        out
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
    /// Streamed command output (best effort, memory only).
    pub output: output::OutputLog,
}

impl Shared {
    /// Remembers that `socket` belongs to `node`.
    pub fn remember_socket(&self, socket: SocketId, node: UserId) {
        if let Ok(mut map) = self.sockets.lock() {
            map.insert(socket, node);
        }
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
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    let path = config.db_path.clone();
    // Opening may repair the file after a crash: keep it off the async threads.
    let store = tokio::task::spawn_blocking(move || Store::open(path))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
    let store = Arc::new(store);
    // The NATS connection and the consumers live on their own runtime (deps.md, trap 5).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("scheduler-nats")
        .enable_all()
        .build()?;
    let setup_config = config.clone();
    let shared = runtime
        .spawn(async move { connect(setup_config, store).await })
        .await
        .map_err(|e| Error::Nats(e.to_string()))??;
    bus::start(&runtime, &shared)
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;

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
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)?
    .run();
    let handle = server.handle();
    let task = actix_web::rt::spawn(server);
    tracing::info!("scheduler started.");
    shutdown.await;
    handle.stop(true).await;
    let _ = task.await;
    let _ = tokio::time::timeout(Duration::from_secs(3), shared.client.flush()).await;
    drop(shared);
    // The consumers hold the store; wait (off the async threads, where a runtime may not
    // block) until they are dropped, so the redb file is closed when `run` returns and a
    // new instance can open it at once.
    let _ =
        tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5))).await;
    tracing::info!("scheduler stopped.");
    Ok(())
}

async fn connect(config: Config, store: Arc<Store>) -> Result<Arc<Shared>, Error> {
    let client = async_nats::ConnectOptions::new()
        .name("scheduler")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    Ok(Arc::new(Shared {
        config,
        client,
        store,
        metrics: Metrics::default(),
        sockets: Mutex::new(HashMap::new()),
        output: output::OutputLog::default(),
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
