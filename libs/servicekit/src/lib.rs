//! Plumbing shared by the service binaries, kept in one place so every service behaves the
//! same way: SIGTERM/SIGINT handling ([`shutdown_signal`], the agent's too), log set-up
//! ([`telemetry`]), running a service on its own thread with its own actix system (how
//! tests drive services in-process), the wall clock ([`clock`]), NATS connection and
//! runtime set-up ([`nats`]), the KV lease both the gateway's worker ids and the
//! scheduler's leadership use ([`lease`]), the HTTP APIs' JSON error shape and API-key
//! check ([`http`]), query strings ([`query`]), the one HTTP client ([`http_client`]), a
//! stand-alone `/metrics` endpoint ([`metrics_server`]), byte streams multiplexed over one
//! connection with per-stream credit ([`mux`], the relay's machinery), TLS set-up ([`tls`]: rustls
//! with ring, PEM files, key pins) and, with the `redb` feature, opening a durable file and its
//! errors (`durable`, the agent's outbox and the scheduler's store). It holds no business logic and no wire contract (that
//! is `libs/messages`).

pub mod clock;
#[cfg(feature = "redb")]
pub mod durable;
pub mod hops;
pub mod http;
pub mod http_client;
pub mod lease;
pub mod metrics_server;
pub mod mux;
pub mod nats;
pub mod query;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};

use tokio::sync::oneshot;

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A service running on its own thread and actix system.
#[derive(Debug)]
pub struct Handle<E> {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<Result<(), E>>>,
}

/// Runs `service(listener, shutdown)` on a new thread named `name` inside its own actix
/// system; the shutdown future completes when the handle is shut down or dropped.
pub fn spawn<E, F, Fut>(name: &str, listener: TcpListener, service: F) -> std::io::Result<Handle<E>>
where
    E: std::fmt::Display + Send + 'static,
    F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + 'static,
{
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (done_tx, done) = oneshot::channel();
    let thread_name = name.to_owned();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let result = actix_web::rt::System::new().block_on(service(listener, stop_rx));
            if let Err(e) = &result {
                tracing::error!(service = %thread_name, error = %e, "Service failed.");
            }
            let _ = done_tx.send(result);
        })?;
    Ok(Handle {
        addr,
        stop: Some(stop),
        done: Some(done),
    })
}

impl<E> Handle<E> {
    /// Where the service listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks the service to stop and waits until it has.
    pub async fn shutdown(mut self) -> Result<(), E> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.done.take() {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl<E> Drop for Handle<E> {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
