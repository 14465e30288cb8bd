//! ws-api: the brain for application traffic. It consumes what gateways publish (session
//! events, join/leave requests, receipts, clients' publish frames), keeps the session and
//! presence registry in JetStream KV, decides room membership, and offers product services
//! an HTTP API to push to sockets, users, rooms or everyone.
//!
//! Replicas share the bus consumers through a queue group and share state only through
//! NATS, so any number can run; [`run`] is the whole service, [`spawn`] runs it on its own
//! thread for tests.
//!
//! Modules:
//! - [`config`]: flags and `WS_API_*` variables, validated into a [`Config`].
//! - `http`: the HTTP API (`/v1/push`, presence queries, receipts, OpenAPI, health).
//! - [`events`]: the bus consumers: session events, join/leave requests, receipts and
//!   clients' publish frames (forwarded to `app.<route>`).
//! - [`demo`]: the chat/presence demo page at `/demo/`, its development tokens (only with
//!   `--demo-token-secret`) and its relay.
//! - [`presence`]: sessions and presence in JetStream KV, with the watched in-memory index.
//! - [`receipts`]: per-push delivery and ack counts in KV.
//! - [`history`]: pushes kept in the JetStream stream `WS_HISTORY` with per-stream epoch
//!   and offset, so gateways can replay what a reconnecting client missed (ADR 0017).
//!
//! A push: `http` validates `POST /v1/push`, resolves its audience from [`presence`], builds
//! the push envelope (`messages::envelope`) and publishes it once per subject; with a receipt
//! requested, [`receipts`] opens the record that [`events`] then counts `delivered` and `ack`
//! events into. A client's publish: [`events`] consumes `ws.msg.app.<route>` and republishes
//! it on `app.<route>` with its routing headers.

pub mod config;
pub mod demo;
mod events;
mod history;
mod http;
mod presence;
mod receipts;

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

pub use config::{Args, Config, ConfigError};

use crate::presence::Presence;
use crate::receipts::Receipts;

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
    /// The session bucket could not be opened.
    #[error("nats: {0}")]
    Presence(#[from] presence::PresenceError),
    /// The receipt bucket could not be opened.
    #[error("nats: {0}")]
    Receipts(#[from] receipts::ReceiptError),
    /// The history stream could not be made.
    #[error("nats: {0}")]
    History(#[from] history::HistoryError),
}

/// Counters of one replica.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Pushes published.
    pub pushes: Counter,
    /// Gateway events handled.
    pub events: Counter,
    /// Events that failed.
    pub event_errors: Counter,
    /// Publish frames forwarded to product services.
    pub forwarded: Counter,
    /// Sockets a gateway was asked to announce again (vouched for, but no record).
    pub resync_asked: Counter,
    /// Per-hop latency from the messages' `ws-hop` stamps.
    pub hops: servicekit::hops::HopLatency,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ws_api");
        let pushes = Counter::default();
        registry.register("pushes", "Pushes published", pushes.clone());
        let events = Counter::default();
        registry.register("events", "Gateway events handled", events.clone());
        let event_errors = Counter::default();
        registry.register(
            "event_errors",
            "Gateway events that failed",
            event_errors.clone(),
        );
        let forwarded = Counter::default();
        registry.register(
            "forwarded",
            "Client frames forwarded to product services",
            forwarded.clone(),
        );
        let resync_asked = Counter::default();
        registry.register(
            "presence_resync_asked",
            "Live sockets without a session record that their gateway was asked to announce",
            resync_asked.clone(),
        );
        let hops = servicekit::hops::HopLatency::register(&mut registry);
        Metrics {
            registry,
            pushes,
            events,
            event_errors,
            forwarded,
            resync_asked,
            hops,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        servicekit::http::encode_metrics(&self.registry)
    }
}

/// State shared by handlers and consumers.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: Config,
    /// NATS client.
    pub client: async_nats::Client,
    /// Session registry.
    pub presence: Arc<Presence>,
    /// Push receipts.
    pub receipts: Receipts,
    /// Message history.
    pub history: history::History,
    /// Metrics.
    pub metrics: Metrics,
    /// Pushes per second over the last second, sampled.
    push_rate: AtomicU64,
}

impl Shared {
    /// Pushes per second, sampled once a second.
    pub fn push_rate(&self) -> u64 {
        self.push_rate.load(Ordering::Relaxed)
    }
}

/// Runs a replica with its HTTP API on `listener` until `shutdown` completes. Must be called
/// inside an actix system.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    // The NATS connection and the consumers live on their own runtime (docs/dependencies.md, trap 5).
    let runtime = servicekit::nats::runtime("ws-api-nats")?;
    let setup_config = config.clone();
    let shared = match runtime
        .spawn(async move { setup(setup_config).await })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))
        .and_then(|r| r)
    {
        Ok(shared) => shared,
        Err(e) => {
            // Dropping a runtime inside this async context would panic; let it go quietly.
            runtime.shutdown_background();
            return Err(e);
        }
    };
    runtime.spawn(events::consume_events(Arc::clone(&shared)));
    runtime.spawn(events::forward_upstream(Arc::clone(&shared)));
    runtime.spawn(sweep(Arc::downgrade(&shared)));
    runtime.spawn(sample_rate(Arc::downgrade(&shared)));
    runtime.spawn(flush_receipts(Arc::downgrade(&shared)));

    let data = web::Data::new(Arc::clone(&shared));
    let max = config.max_body_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(max + 4096))
            .app_data(
                web::JsonConfig::default()
                    .limit(max + 4096)
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
    tracing::info!("ws-api started.");
    shutdown.await;
    handle.stop(true).await;
    let _ = task.await;
    // Counted acks go to the bucket before the replica leaves.
    let last = Arc::clone(&shared);
    let _ = runtime
        .spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(3), last.receipts.flush()).await;
        })
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(3), shared.client.flush()).await;
    drop(shared);
    runtime.shutdown_background();
    tracing::info!("ws-api stopped.");
    Ok(())
}

async fn setup(config: Config) -> Result<Arc<Shared>, Error> {
    let client = servicekit::nats::connect(&config.nats_url, "ws-api").await?;
    let js = async_nats::jetstream::new(client.clone());
    // JetStream may take a moment after the server starts (or a cluster elects a leader).
    let mut attempt = 0;
    let (presence, receipts, history) = loop {
        let opened = async {
            let presence = Presence::open(
                &js,
                &config.sessions_bucket,
                config.presence_ttl,
                config.kv_replicas,
            )
            .await?;
            let receipts = Receipts::open(&js, &config.receipts_bucket, config.kv_replicas).await?;
            let history =
                history::History::open(&js, config.history.clone(), config.kv_replicas).await?;
            Ok::<_, Error>((presence, receipts, history))
        };
        match opened.await {
            Ok(pair) => break pair,
            Err(e) if attempt < 50 => {
                attempt += 1;
                tracing::warn!(error = %e, "Opening the KV buckets failed; retrying.");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    Ok(Arc::new(Shared {
        config,
        client,
        presence,
        receipts,
        history,
        metrics: Metrics::new(),
        push_rate: AtomicU64::new(0),
    }))
}

async fn sweep(shared: std::sync::Weak<Shared>) {
    loop {
        let period = match shared.upgrade() {
            Some(s) => s.config.sweep,
            None => break,
        };
        tokio::time::sleep(period).await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let swept = shared.presence.sweep().await;
        if swept > 0 {
            tracing::info!(swept, "Expired stale sessions.");
        }
    }
}

async fn flush_receipts(shared: std::sync::Weak<Shared>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(receipts::FLUSH_EVERY).await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        match shared.receipts.flush().await {
            Ok(_) => failing = false,
            // Once per outage, not every 100 ms; the counts stay pending meanwhile.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "Writing receipt counts failed; will retry.");
            }
            Err(_) => {}
        }
    }
}

async fn sample_rate(shared: std::sync::Weak<Shared>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let now = shared.metrics.pushes.get();
        shared.push_rate.store(now - last, Ordering::Relaxed);
        last = now;
    }
}

/// A ws-api running on its own thread and actix system (tests, embedding).
pub type Handle = servicekit::Handle<Error>;

/// Starts the service on its own thread and actix system.
pub fn spawn(config: Config, listener: TcpListener) -> Result<Handle, Error> {
    Ok(servicekit::spawn(
        "ws-api",
        listener,
        move |listener, stop| {
            run(config, listener, async {
                let _ = stop.await;
            })
        },
    )?)
}
