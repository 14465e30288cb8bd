//! ws-gateway: terminates WebSocket connections (one actix actor each), authenticates
//! them, gives each a Snowflake socket id, and moves frames between sockets and NATS
//! without decoding bodies. Replicas share nothing but the bus: losing one only makes its
//! clients reconnect elsewhere.
//!
//! [`run`] is the whole service, driven by a listener and a shutdown future so tests run
//! it in-process; [`spawn`] runs it on its own thread for tests.
//!
//! Modules:
//! - [`config`]: flags and `WS_GATEWAY_*` variables, validated into a [`Config`].
//! - `http`: the upgrade handler (token check, admission limits, socket id) and the
//!   health, readiness and metrics endpoints.
//! - [`auth`]: token verification (app tokens and agent tokens, each with its own keys).
//! - [`session`]: the actor per connection: frame decoding, heartbeats, rate limits, the
//!   writer, closes; it applies the rules of [`outbox`].
//! - [`upstream`]: how a client's frame becomes a bus message (subject, headers, body).
//! - [`outbox`]: a connection's inbox for pushes and its bounded outbound queue (slow
//!   consumer, one pong for the latest ping), testable without an actor.
//! - [`ws`]: WebSocket framing (RFC 6455, server side): the incremental decoder and the
//!   encoders of unmasked server messages.
//! - `transport`: the upgraded socket split into a message stream (read through a stack
//!   buffer) and a sink (vectored writes); plain TCP or TLS.
//! - [`hub`]: the one owner of interest and local fan-out: which local sockets belong to
//!   which user, room and agent node ([`registry`]), the subscriptions that follow them,
//!   the delivery of every bus message to its local recipients, and the presence batches
//!   that vouch for every held socket.
//! - [`link`]: the interest link, a NATS connection of its own carrying every subscription
//!   that brings messages for clients (users, agents, rooms, and the replica's push,
//!   broadcast and control subjects; one map entry each), confirmed by PING/PONG.
//! - [`bus`]: the NATS side and nothing else: publishing clients' frames and session
//!   events, and the readiness probe.
//! - [`heartbeat`]: a connection's heartbeat deadline and interval rule.
//! - [`longpoll`]: HTTP long-polling (handshake, send, poll, the move to WebSocket, and
//!   forwarding to the replica that owns a session); its sessions are connections too.
//! - [`history`]: recovery after a reconnect: replays from the history stream, the live
//!   pushes held meanwhile and deduplicated (ADR 0017).
//! - [`lease`]: the worker id behind socket ids (a KV lease via `servicekit::lease`).
//! - [`metrics`]: the Prometheus registry.
//! - [`relay`]: a relay agent's connection, whose streams (its downstreams' connections)
//!   are served like accepted sockets (ADR 0015).
//!
//! A push: [`link`] receives it, the [`hub`] parses
//! its envelope, encodes the complete WebSocket message once and appends the same buffer
//! to the inbox of each local recipient, waking the connection once per batch; each [`session`]
//! actor moves its inbox to its outbound queue and writes it. A client frame: `transport`
//! and [`ws`] deliver the WebSocket message, [`session`] decodes the header and hands the
//! body to [`bus`], which publishes it on `ws.msg.<kind>.<route>` and acks the client once
//! NATS has it.

mod admission;
pub mod auth;
mod bus;
mod config;
mod heartbeat;
pub mod history;
mod http;
mod hub;
pub mod lease;
mod link;
mod longpoll;
mod metrics;
mod outbox;
mod registry;
mod relay;
mod session;
mod transport;
mod upstream;
pub mod ws;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::dev::AppConfig;
use actix_web::{App, web};
use messages::{CloseCode, Snowflake, SocketId};
use rand::Rng;
use servicekit::nats::ConnectError;
use tokio::sync::oneshot;

pub use config::{Args, Config, ConfigError};

use crate::bus::Bus;
use crate::hub::Hub;
use crate::link::{Delivery, Fixed, Interest, Link, LinkTarget};
use crate::metrics::Metrics;
use crate::session::{ConnHandle, ToConn};

/// Longest a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a shutdown step that needs NATS (flush, lease release) may take.
const BUS_STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Binding, runtime creation, serving.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The NATS client could not be created.
    #[error("nats: {0}")]
    Nats(#[from] ConnectError),
}

/// State every connection and task of a replica shares.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: Config,
    /// Who is connected here, their interest, and local fan-out.
    pub hub: Hub<ConnHandle>,
    /// Connection counts against the replica, per-user and per-address limits.
    pub admission: admission::Admission,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The bus side.
    pub bus: Bus,
    /// Long-poll sessions owned here.
    pub longpoll: longpoll::LongPoll,
    /// Id generator for the leased worker id; `None` while no lease is held.
    ids: RwLock<Option<Arc<Snowflake>>>,
    /// Set when shutdown starts.
    draining: AtomicBool,
}

/// Why a replica is or is not ready.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    /// NATS connection is up.
    pub nats: bool,
    /// A subscription probe came back (sessions can be confirmed).
    pub probe: bool,
    /// Leased worker id, if any.
    pub worker_id: Option<u16>,
    /// Shutdown has started.
    pub draining: bool,
}

impl Readiness {
    /// Ready to accept connections.
    pub fn ready(&self) -> bool {
        self.nats && self.probe && self.worker_id.is_some() && !self.draining
    }

    /// One line saying what is missing.
    pub fn describe(&self) -> String {
        let mut missing = vec![];
        if !self.nats {
            missing.push("NATS disconnected (publisher or interest link)");
        }
        if !self.probe {
            missing.push("subscription probe unanswered (NATS permissions?)");
        }
        if self.worker_id.is_none() {
            missing.push("no worker-id lease");
        }
        if self.draining {
            missing.push("draining");
        }
        if missing.is_empty() {
            "ready".into()
        } else {
            missing.join(", ")
        }
    }
}

impl Shared {
    /// Current readiness.
    pub fn readiness(&self) -> Readiness {
        let worker_id = self
            .ids
            .read()
            .ok()
            .and_then(|ids| ids.as_ref().map(|g| g.worker()));
        Readiness {
            nats: self.bus.connected() && self.hub.link().up(),
            probe: self.bus.probe_answered(),
            worker_id,
            draining: self.draining.load(Ordering::Relaxed),
        }
    }

    /// The counters the operator console shows (see [`spawn_stats`]).
    pub fn stats(&self, interval_ms: u64) -> messages::payload::GatewayStats {
        let readiness = self.readiness();
        let agents = self
            .hub
            .for_all(Some(messages::ClientKind::Agent), |_, _| ());
        let apps = self.hub.for_all(Some(messages::ClientKind::App), |_, _| ());
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        messages::payload::GatewayStats {
            instance: self.config.instance.clone(),
            ready: readiness.ready(),
            worker_id: readiness.worker_id,
            app_connections: count(apps),
            agent_connections: count(agents),
            slow_consumer_closes: self.metrics.closes_of(CloseCode::SlowConsumer),
            pushes_delivered: self.metrics.pushes_delivered.get(),
            published: self.metrics.published.get(),
            interval_ms,
            sent_at_ms: servicekit::clock::now_ms(),
        }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        usize::try_from(self.metrics.connections.get()).unwrap_or(0)
    }

    /// Mints a socket id; `None` without a lease or when the clock misbehaves.
    pub fn mint(&self) -> Option<SocketId> {
        let ids = self.ids.read().ok()?.clone()?;
        match ids.next_id() {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot mint a socket id.");
                None
            }
        }
    }

    fn set_worker(&self, worker: Option<u16>) {
        let generator = worker.and_then(|w| Snowflake::new(w).ok()).map(Arc::new);
        self.metrics.worker_id.set(worker.map_or(-1, i64::from));
        if let Ok(mut ids) = self.ids.write() {
            *ids = generator;
        }
    }
}

/// Runs a replica on `listener` until `shutdown` completes, then drains and exits. Must be
/// called inside an actix system (`actix_web::rt::System`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    // Parsed before the runtime exists, so a bad setting costs no thread.
    servicekit::nats::NatsTarget::parse(&config.nats_url).map_err(ConnectError::from)?;
    let nats_runtime = servicekit::nats::runtime("ws-gateway-nats")?;
    let (url, name) = (
        config.nats_url.clone(),
        format!("ws-gateway/{}", config.instance),
    );
    let client = match nats_runtime
        .spawn(async move { servicekit::nats::connect(&url, &name).await })
        .await
    {
        Ok(Ok(client)) => client,
        // Dropping a runtime inside this async context would panic; let it go quietly.
        Ok(Err(e)) => {
            nats_runtime.shutdown_background();
            return Err(e.into());
        }
        Err(e) => {
            nats_runtime.shutdown_background();
            return Err(Error::Io(std::io::Error::other(e)));
        }
    };

    let metrics = Arc::new(Metrics::new());
    let bus = Bus::start(
        client.clone(),
        nats_runtime.handle().clone(),
        Arc::clone(&metrics),
        &config.instance,
    );
    let link = Link::new();
    // Parsed above already; this cannot fail here, but must not panic if it did.
    let target =
        servicekit::nats::NatsTarget::parse(&config.nats_url).map_err(ConnectError::from)?;
    let link_task = nats_runtime.spawn(Arc::clone(&link).run(LinkTarget::new(
        &target,
        format!("ws-gateway/{}/interest", config.instance),
    )));
    let publish_to = bus.sender();
    let hub = Hub::new(
        Arc::clone(&link),
        config.instance.clone(),
        config.outbound_queue,
        config.max_rooms_per_socket,
        Arc::clone(&metrics),
        Box::new(move |out| publish_to.send(out).is_ok()),
    );
    let shared = Arc::new(Shared {
        config: config.clone(),
        hub,
        admission: admission::Admission::new(admission::Caps {
            total: config.max_connections,
            per_user: config.max_connections_per_user,
            per_ip: config.max_connections_per_ip,
        }),
        metrics,
        bus,
        longpoll: longpoll::LongPoll::default(),
        ids: RwLock::new(None),
        draining: AtomicBool::new(false),
    });
    // Weak references: a subscription must not keep the gateway's state alive.
    let weak = Arc::downgrade(&shared);
    link.set_handler(Arc::new(move |interest: &Interest, delivery: Delivery| {
        if let Some(shared) = weak.upgrade() {
            shared.hub.on_interest(interest, &delivery);
        }
    }));
    let fixed_subscriptions: Vec<_> = Fixed::all(&config.instance)
        .into_iter()
        .map(|interest| link.subscribe(interest))
        .collect();
    let probe_subscription = shared.bus.subscribe_probe();
    let presence = spawn_presence_sync(&shared, config.presence_sync);
    let stats = config
        .stats_interval
        .map(|period| spawn_stats(&shared, period));
    let bus_watch = config
        .bus_loss_shed
        .map(|after| spawn_bus_watch(&shared, after));
    let (lease_stop, lease_stop_rx) = oneshot::channel();
    let lease_task = nats_runtime.spawn(maintain_lease(
        Arc::downgrade(&shared),
        client,
        lease::LeaseConfig {
            bucket: config.lease_bucket.clone(),
            ttl: config.lease_ttl,
            replicas: config.lease_replicas,
            instance: config.instance.clone(),
        },
        lease_stop_rx,
    ));

    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let server = serve(&shared, listener, workers)?;
    let tls_reload = spawn_tls_reload(&shared);
    let server_handle = server.handle();
    let server_task = actix_web::rt::spawn(server);
    tracing::info!(instance = %config.instance, workers, "Gateway started.");

    shutdown.await;
    tracing::info!("Shutdown requested; draining.");
    let deadline = config.shutdown_deadline;
    let sequence = async {
        drain(&shared).await;
        server_handle.stop(true).await;
        // Bounded: with NATS down there is nothing to flush to, and exit must not wait.
        if tokio::time::timeout(BUS_STEP_TIMEOUT, shared.bus.flush())
            .await
            .is_err()
        {
            tracing::warn!("Flushing to NATS timed out; events still queued are lost.");
        }
        let _ = lease_stop.send(());
        let _ = tokio::time::timeout(BUS_STEP_TIMEOUT, lease_task).await;
    };
    if tokio::time::timeout(deadline, sequence).await.is_err() {
        tracing::warn!(?deadline, "Shutdown deadline passed; exiting anyway.");
        server_handle.stop(false).await;
    }
    let _ = server_task.await;
    presence.abort();
    if let Some(task) = stats {
        task.abort();
    }
    if let Some(task) = bus_watch {
        task.abort();
    }
    if let Some(task) = tls_reload {
        task.abort();
    }
    drop(fixed_subscriptions);
    drop(probe_subscription);
    link_task.abort();
    drop(shared);
    nats_runtime.shutdown_background();
    tracing::info!("Gateway stopped.");
    Ok(())
}

/// The HTTP service of one worker: actix-web for the operational endpoints, and
/// actix-http's upgrade hook handing WebSocket requests, with their connection, to
/// [`http::upgrade`]. A macro because the plain and TLS variants differ in the IO type.
macro_rules! http_service {
    ($shared:expr) => {{
        let shared: &Arc<Shared> = $shared;
        let app = App::new()
            .app_data(web::Data::new(Arc::clone(shared)))
            .configure(http::routes);
        let upgrade_shared = Arc::clone(shared);
        actix_http::HttpService::build()
            .tcp_nodelay(true)
            .upgrade(actix_service::fn_service(move |(req, framed)| {
                http::upgrade(Arc::clone(&upgrade_shared), req, framed)
            }))
            .finish(actix_service::map_config(app, |()| AppConfig::default()))
    }};
}

/// Serves one stream of a relay connection (ADR 0015) with the same HTTP service as an
/// accepted socket, tagging its sessions with the relay's node id.
pub(crate) async fn serve_relayed<T>(
    shared: &Arc<Shared>,
    via: messages::UserId,
    io: T,
    peer: Option<std::net::SocketAddr>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use actix_service::{Service, ServiceFactory};
    let app = App::new()
        .app_data(web::Data::new(Arc::clone(shared)))
        .configure(http::routes);
    let upgrade_shared = Arc::clone(shared);
    let factory = actix_http::HttpService::build()
        .on_connect_ext(move |_: &T, ext: &mut actix_http::Extensions| {
            ext.insert(relay::Via(via.clone()));
        })
        .upgrade(actix_service::fn_service(move |(req, framed)| {
            http::upgrade(Arc::clone(&upgrade_shared), req, framed)
        }))
        .finish(actix_service::map_config(app, |()| AppConfig::default()));
    match factory.new_service(()).await {
        Ok(service) => {
            if let Err(e) = service.call((io, actix_http::Protocol::Http1, peer)).await {
                tracing::debug!(error = ?e, "A relayed stream's HTTP exchange failed.");
            }
        }
        Err(e) => tracing::warn!(error = ?e, "No HTTP service for a relayed stream."),
    }
}

/// The HTTP server on `listener`, with TLS when a certificate is configured.
fn serve(
    shared: &Arc<Shared>,
    listener: TcpListener,
    workers: usize,
) -> std::io::Result<actix_web::dev::Server> {
    let accept_limit = shared.config.accept_limit_per_worker();
    if let Some(bytes) = shared.config.socket_send_buffer {
        set_send_buffer(&listener, bytes)?;
    }
    let builder = actix_web::dev::Server::build()
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(2)
        .backlog(4096)
        // Only HTTP connections count here (a WebSocket leaves the HTTP layer once
        // upgraded), and actix's own per-worker cap (25,600 by default) must not be the one
        // that bites: beyond it clients wait in the backlog instead of getting our 503.
        .max_concurrent_connections(accept_limit);
    let shared = Arc::clone(shared);
    let builder = match shared.config.tls.clone() {
        None => builder.listen("ws-gateway", listener, move || http_service!(&shared).tcp())?,
        Some(cert) => {
            let tls = cert.server_config().map_err(std::io::Error::other)?;
            builder.listen("ws-gateway-tls", listener, move || {
                let acceptor = actix_http::TlsAcceptorConfig::default()
                    .handshake_timeout(TLS_HANDSHAKE_TIMEOUT);
                http_service!(&shared).rustls_0_23_with_config(tls.clone(), acceptor)
            })?
        }
    };
    Ok(builder.run())
}

/// Sets SO_SNDBUF on the listener. Linux copies a listener's buffer sizes (and the lock that
/// turns auto-tuning off) into every socket it accepts, so this bounds each client's kernel
/// send buffer without touching actix's accept loop.
fn set_send_buffer(listener: &TcpListener, bytes: usize) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_send_buffer_size(bytes)
}

/// Re-reads the certificate files when they change and on SIGHUP, until the gateway stops.
/// New handshakes get the new certificate; established connections keep theirs.
fn spawn_tls_reload(shared: &Arc<Shared>) -> Option<tokio::task::JoinHandle<()>> {
    let cert = shared.config.tls.clone()?;
    let every = shared.config.tls_reload;
    let metrics = Arc::clone(&shared.metrics);
    Some(actix_web::rt::spawn(async move {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = every.map(tokio::time::interval);
        loop {
            let forced = tokio::select! {
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                _ = async { match tick.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => false,
            };
            let outcome = if forced {
                cert.reload().map(|()| true)
            } else {
                cert.reload_if_changed()
            };
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    metrics.tls_reloaded(true);
                    tracing::info!("TLS certificate reloaded.");
                }
                Err(e) => {
                    metrics.tls_reloaded(false);
                    tracing::error!(error = %e, "TLS certificate reload failed; still serving the previous one.");
                }
            }
        }
    }))
}

/// Acquires a worker-id lease (retrying while NATS is unreachable), keeps it, mirrors its
/// state into the id generator, and releases it when `stop` fires.
async fn maintain_lease(
    shared: std::sync::Weak<Shared>,
    client: async_nats::Client,
    config: lease::LeaseConfig,
    mut stop: oneshot::Receiver<()>,
) {
    let js = async_nats::jetstream::new(client);
    let mut backoff = Duration::from_millis(100);
    let lease = loop {
        match lease::acquire(&js, &config).await {
            Ok(lease) => break lease,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Worker-id lease not acquired.");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    tracing::info!(worker_id = lease.worker_id(), "Worker-id lease acquired.");
    let keeper = lease::LeaseKeeper::spawn(js, config, lease);
    let mut watch = keeper.watch();
    loop {
        let worker = *watch.borrow_and_update();
        match shared.upgrade() {
            Some(shared) => {
                shared.set_worker(worker);
                longpoll::serve(&shared, worker);
            }
            None => break,
        }
        if worker.is_none() {
            tracing::warn!("Worker-id lease lost; refusing new connections until it is back.");
        }
        tokio::select! {
            changed = watch.changed() => if changed.is_err() { break },
            _ = &mut stop => break,
        }
    }
    if let Some(shared) = shared.upgrade() {
        shared.set_worker(None);
        longpoll::serve(&shared, None);
    }
    keeper.release().await;
}

/// Asks every client to reconnect at a random point of the drain window (so other replicas
/// are not stampeded), closing with `code` then. Returns how many were asked.
fn send_elsewhere(shared: &Shared, code: CloseCode, reason: &'static str) -> usize {
    let window = shared.config.drain_window;
    let mut rng = rand::rng();
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    shared.hub.for_all(None, |_, addr| {
        let delay = Duration::from_millis(rng.random_range(0..=window_ms));
        addr.do_send(ToConn::Reconnect {
            delay,
            code,
            reason,
        });
    })
}

/// Stops admitting, sends every client elsewhere and waits until they are gone.
async fn drain(shared: &Shared) {
    shared.draining.store(true, Ordering::Relaxed);
    let window = shared.config.drain_window;
    let count = send_elsewhere(shared, CloseCode::Shutdown, "gateway draining");
    tracing::info!(connections = count, ?window, "Draining.");
    let give_up = tokio::time::Instant::now() + window + Duration::from_secs(2);
    while shared.connections() > 0 && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often the bus watch looks at the NATS connections.
const BUS_WATCH_TICK: Duration = Duration::from_millis(250);

/// Watches the NATS connections: once they have been down for `shed_after`, the clients
/// are sent to other replicas (reconnect frames over the drain window, close 4003), once
/// per outage. A replica cut off from the bus can still write to its sockets but can
/// neither deliver pushes nor take publishes: its clients are better served elsewhere
/// than kept on a replica that answers every publish with an error. Upgrades are refused
/// (503) while the bus is down, so nobody comes back until it returns.
fn spawn_bus_watch(shared: &Arc<Shared>, shed_after: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    shared.bus.runtime().spawn(async move {
        let mut tick = tokio::time::interval(BUS_WATCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut down_since: Option<tokio::time::Instant> = None;
        let mut shed = false;
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            if shared.readiness().nats {
                if shed {
                    tracing::info!("NATS is back; accepting clients again.");
                }
                down_since = None;
                shed = false;
                continue;
            }
            let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
            if !shed && since.elapsed() >= shed_after && !shared.draining.load(Ordering::Relaxed) {
                shed = true;
                let count =
                    send_elsewhere(&shared, CloseCode::NotReady, "gateway lost the message bus");
                tracing::warn!(
                    connections = count,
                    outage = ?since.elapsed(),
                    "NATS unreachable; sending clients to other replicas."
                );
            }
        }
    })
}

/// Publishes the presence batches every `period` until the returned task is aborted.
fn spawn_presence_sync(shared: &Arc<Shared>, period: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    shared.bus.runtime().spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            shared.hub.sync_presence();
        }
    })
}

/// Publishes this replica's [`messages::payload::GatewayStats`] every `period` until the
/// returned task is aborted. Plain core NATS, fire and forget: a missed envelope only makes
/// the console's view one period older, and the scheduler forgets a replica that stops
/// sending.
fn spawn_stats(shared: &Arc<Shared>, period: Duration) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    let subject = messages::subject::gateway_stats(&shared.config.instance);
    let interval_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
    shared.bus.runtime().spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            let stats = shared.stats(interval_ms);
            let client = shared.bus.client().clone();
            drop(shared);
            let Ok(body) = messages::payload::to_bus(&stats) else {
                continue;
            };
            if let Err(e) = client.publish(subject.clone(), body.into()).await {
                tracing::debug!(error = %e, "Publishing stats failed.");
            }
        }
    })
}

/// A ws-gateway running on its own thread and actix system (tests, embedding).
pub type Handle = servicekit::Handle<Error>;

/// Starts the service on its own thread and actix system.
pub fn spawn(config: Config, listener: TcpListener) -> Result<Handle, Error> {
    Ok(servicekit::spawn(
        "ws-gateway",
        listener,
        move |listener, stop| {
            run(config, listener, async {
                let _ = stop.await;
            })
        },
    )?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write as _;

    use super::*;

    /// The gateway never sees its accepted sockets before actix does, so the bound rests on
    /// Linux copying the listener's SO_SNDBUF (and its auto-tuning lock) into each of them.
    #[test]
    fn accepted_sockets_inherit_the_listeners_send_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_send_buffer(&listener, 64 * 1024).unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // Linux doubles the value asked for (the other half is its bookkeeping).
        assert_eq!(
            socket2::SockRef::from(&accepted)
                .send_buffer_size()
                .unwrap(),
            128 * 1024
        );
        // Still a working connection.
        client.write_all(b"x").unwrap();
    }
}
