//! The NATS side of the gateway, and nothing else: one publisher task that hands upstream
//! frames and events to the bus in order, and the probe that readiness rests on (the
//! replica's NATS user may publish and subscribe to its probe subject). Nothing delivered
//! to clients arrives here: every subscription for them, fixed subjects included, is on
//! the interest link (`link.rs`), owned by the hub.
//!
//! Everything here runs on a dedicated multi-thread Tokio runtime that owns the async-nats
//! connection (docs/dependencies.md, trap 5): actix workers are single-threaded runtimes, and the NATS
//! connection must not depend on one of them. Actors reach this side through a bounded
//! queue (`try_send`, never blocking) and hear of their publishes through an actix
//! [`Recipient`], so this module knows no actor type.
//!
//! async-nats' `flush` only writes the socket, so the probe subscription is proved live
//! with a [`Probe`]: a message to the gateway's own probe subject, published after the SUB
//! on the same connection, comes back only after the server has handled the SUB (a server
//! processes one client's protocol operations in order). A replica whose probe never came
//! back is not ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::Recipient;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use messages::{GatewayId, headers, subject};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Capacity of the queue between actors and the publisher task.
const OUTBOUND_CAPACITY: usize = 16 * 1024;
/// How long the prober waits for one probe before sending the next regardless.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// How long the first probe may take before the gateway reports the problem (again).
const FIRST_PROBE_WAIT: Duration = Duration::from_secs(5);

/// Something for the publisher task.
#[derive(Debug)]
pub enum Outbound {
    /// Publish one message; on success, tell `reply`'s actor its frame was published.
    Publish {
        /// Subject.
        subject: String,
        /// Headers.
        headers: HeaderMap,
        /// Body bytes, untouched.
        payload: Bytes,
        /// Who to tell the outcome, with the client frame id it is about.
        reply: Option<(Recipient<PublishOutcome>, u64)>,
    },
    /// Flush everything queued before this, then answer.
    Flush(oneshot::Sender<()>),
}

/// What became of a client's publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, actix::Message)]
#[rtype(result = "()")]
pub enum PublishOutcome {
    /// The message with this client frame id reached the bus.
    Published(u64),
    /// It could not be published (the bus is unavailable).
    Failed(u64),
}

/// Queues messages for the publisher (see [`Bus::send`]).
#[derive(Debug, Clone)]
pub struct Sender {
    client: Client,
    outbound: mpsc::Sender<Outbound>,
}

impl Sender {
    /// As [`Bus::send`].
    pub fn send(&self, out: Outbound) -> Result<(), &'static str> {
        queue(&self.client, &self.outbound, out)
    }
}

fn queue(
    client: &Client,
    outbound: &mpsc::Sender<Outbound>,
    out: Outbound,
) -> Result<(), &'static str> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err("message bus unavailable; not delivered");
    }
    outbound.try_send(out).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => "gateway publish queue full; not delivered",
        mpsc::error::TrySendError::Closed(_) => "gateway shutting down; not delivered",
    })
}

/// Handle to the bus side, shared by every actor.
#[derive(Debug)]
pub struct Bus {
    client: Client,
    runtime: tokio::runtime::Handle,
    outbound: mpsc::Sender<Outbound>,
    probe: Arc<Probe>,
}

/// Round trips through this gateway's own NATS server, proving that every SUB sent before a
/// [`Probe::confirm`] call has been processed. Probe bodies carry this process's nonce and a
/// sequence number; bodies with another nonce (another replica of the same name, a stray
/// publisher) are ignored.
#[derive(Debug)]
pub(crate) struct Probe {
    subject: String,
    nonce: u64,
    /// Highest sequence number any caller asked to have confirmed.
    requested: AtomicU64,
    /// Highest sequence number that came back.
    confirmed: watch::Sender<u64>,
    wake: Notify,
}

impl Probe {
    fn new(subject: String) -> Self {
        Probe {
            subject,
            nonce: rand::random(),
            requested: AtomicU64::new(0),
            confirmed: watch::channel(0).0,
            wake: Notify::new(),
        }
    }

    /// Resolves once a probe published after this call has come back, i.e. once the server
    /// has processed every subscription this client sent before the call. Never resolves
    /// while the server does not answer; callers bound it with a timeout.
    pub(crate) async fn confirm(&self) {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut confirmed = self.confirmed.subscribe();
        self.wake.notify_one();
        let _ = confirmed.wait_for(|seq| *seq >= ticket).await;
    }

    fn received(&self, body: &[u8]) {
        let (Some(nonce), Some(seq)) = (
            body.get(..8).and_then(|b| b.try_into().ok()),
            body.get(8..16).and_then(|b| b.try_into().ok()),
        ) else {
            return;
        };
        if u64::from_be_bytes(nonce) != self.nonce {
            return;
        }
        let seq = u64::from_be_bytes(seq);
        self.confirmed.send_if_modified(|c| {
            let newer = seq > *c;
            if newer {
                *c = seq;
            }
            newer
        });
    }
}

/// Probes until the first answer, saying loudly why sessions are refused meanwhile: a
/// probe that never returns is nearly always a NATS user without permission for the probe
/// subject (an `auth.conf` from before the probe existed).
async fn first_probe(probe: Arc<Probe>) {
    while tokio::time::timeout(FIRST_PROBE_WAIT, probe.confirm())
        .await
        .is_err()
    {
        tracing::error!(
            subject = %probe.subject,
            "Subscription probe unanswered; not ready, no session can be confirmed. Check that \
             this gateway's NATS user may publish and subscribe to the probe subject \
             (nats/auth.conf)."
        );
    }
}

/// Publishes probes one at a time, each covering every request made before it: the next
/// probe goes out only once the previous one came back (or a second passed), so under a
/// connect storm thousands of subscriptions share one round trip instead of each paying a
/// publish and a delivery.
async fn prober(client: Client, probe: Arc<Probe>) {
    let mut confirmed = probe.confirmed.subscribe();
    loop {
        probe.wake.notified().await;
        let wanted = probe.requested.load(Ordering::SeqCst);
        if wanted <= *confirmed.borrow_and_update() {
            continue;
        }
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&probe.nonce.to_be_bytes());
        body[8..].copy_from_slice(&wanted.to_be_bytes());
        // A probe lost to a disconnect leaves its waiters to their timeouts; the next request
        // publishes a newer one.
        if let Err(e) = client
            .publish(probe.subject.clone(), Bytes::copy_from_slice(&body))
            .await
        {
            tracing::debug!(error = %e, "Subscription probe not published.");
            continue;
        }
        let _ = tokio::time::timeout(PROBE_WAIT, confirmed.wait_for(|seq| *seq >= wanted)).await;
        // Requests that arrived meanwhile left a permit on `wake`: the loop goes round again.
    }
}

impl Bus {
    /// Wraps a connected client and starts the publisher task on `runtime`.
    pub fn start(
        client: Client,
        runtime: tokio::runtime::Handle,
        shared_metrics: Arc<crate::metrics::Metrics>,
        instance: &GatewayId,
    ) -> Self {
        let (outbound, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        runtime.spawn(publisher(client.clone(), rx, shared_metrics));
        let probe = Arc::new(Probe::new(subject::gateway_probe(instance)));
        runtime.spawn(prober(client.clone(), Arc::clone(&probe)));
        Bus {
            client,
            runtime,
            outbound,
            probe,
        }
    }

    /// Whether a subscription probe has ever come back: until then no session can be
    /// confirmed, so the replica is not ready.
    pub fn probe_answered(&self) -> bool {
        *self.probe.confirmed.borrow() > 0
    }

    /// Whether the NATS connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The client (for the lease and tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The runtime the bus side runs on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Queues a message for the bus without waiting. Fails fast, with a reason for the
    /// client, when NATS is down or the queue is full: the caller reports it; nothing is
    /// dropped silently.
    pub fn send(&self, out: Outbound) -> Result<(), &'static str> {
        queue(&self.client, &self.outbound, out)
    }

    /// A handle that queues messages like [`Bus::send`], for the hub.
    pub fn sender(&self) -> Sender {
        Sender {
            client: self.client.clone(),
            outbound: self.outbound.clone(),
        }
    }

    /// Whether [`Bus::send`] would currently accept a message (connected, queue not full).
    pub fn send_ok(&self) -> bool {
        self.connected() && self.outbound.capacity() > 0
    }

    /// Waits until everything queued so far has been written to NATS and flushed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.outbound.send(Outbound::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

async fn publisher(
    client: Client,
    mut rx: mpsc::Receiver<Outbound>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Publish {
                subject,
                mut headers,
                payload,
                reply,
            } => {
                headers::stamp_hop(
                    &mut headers,
                    headers::hop::GATEWAY_PUB,
                    headers::now_micros(),
                );
                match client.publish_with_headers(subject, headers, payload).await {
                    Ok(()) => {
                        metrics.published.inc();
                        if let Some((to, msg_id)) = reply {
                            to.do_send(PublishOutcome::Published(msg_id));
                        }
                    }
                    Err(e) => {
                        metrics.publish_errors.inc();
                        tracing::warn!(error = %e, "NATS publish failed.");
                        if let Some((to, msg_id)) = reply {
                            to.do_send(PublishOutcome::Failed(msg_id));
                        }
                    }
                }
            }
            Outbound::Flush(done) => {
                if let Err(e) = client.flush().await {
                    tracing::warn!(error = %e, "NATS flush failed.");
                }
                let _ = done.send(());
            }
        }
    }
}

/// The probe subscription's task; dropping it unsubscribes (async-nats unsubscribes when
/// the subscriber is dropped).
#[derive(Debug)]
pub struct ProbeSubscription(tokio::task::AbortHandle);

impl Drop for ProbeSubscription {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Bus {
    /// Subscribes to the probe subject, for as long as the returned handle lives, and
    /// starts probing: the first answer makes the replica ready.
    pub fn subscribe_probe(&self) -> ProbeSubscription {
        let client = self.client.clone();
        let probe = Arc::clone(&self.probe);
        ProbeSubscription(
            self.runtime
                .spawn(async move {
                    let mut sub = match client.subscribe(probe.subject.clone()).await {
                        Ok(sub) => sub,
                        Err(e) => {
                            tracing::error!(subject = %probe.subject, error = %e, "Subscribing failed.");
                            return;
                        }
                    };
                    tokio::spawn(first_probe(Arc::clone(&probe)));
                    while let Some(msg) = sub.next().await {
                        probe.received(&msg.payload);
                    }
                })
                .abort_handle(),
        )
    }
}
