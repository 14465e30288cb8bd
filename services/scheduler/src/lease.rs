//! The leader lease: only one scheduler is active at a time.
//!
//! The lease is one key ([`KEY`]) held through [`servicekit::lease`], which owns the
//! mechanism (bucket, compare-and-set refreshes, loss detection, release). This module is
//! the scheduler's policy on top: [`acquire`] retries the create until it succeeds (that is
//! the standby's wait), and a [`Keeper`] refreshes the lease on its own runtime and reports
//! its loss once. Losing the lease is final for this process: [`crate::run`] stops with
//! [`crate::Error::LeaseLost`] rather than trying to become active again, because a clean
//! restart is the simplest way to be sure nothing of the old active phase keeps running.
//!
//! Unlike the gateway's worker-id leases, a lease holding our own instance name is *not*
//! reclaimed: two instances started with the same name (the default is the host name)
//! would otherwise both believe they are active. A restarted instance therefore waits for
//! its old lease to expire, which costs at most one TTL after a crash (a graceful stop
//! deletes the key at once).

use std::time::Duration;

use async_nats::jetstream::Context;
use bytes::Bytes;
use servicekit::lease::{
    Bucket, BucketConfig, Held, LeaseError, MAX_OP_TIMEOUT, MAX_RETRY, MIN_RETRY,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tracing::{debug, info, warn};

pub use servicekit::lease::Lease;

/// Bucket the lease lives in unless configured otherwise.
pub const DEFAULT_BUCKET: &str = "scheduler_leader";
/// The one key in the bucket.
pub const KEY: &str = "leader";
/// Lease TTL unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// Where and as whom this instance leases leadership.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Key-value bucket holding the lease.
    pub bucket: String,
    /// How long the lease lives without a refresh; the bucket's `max_age` when this
    /// instance creates it.
    pub ttl: Duration,
    /// This instance's stable name, stored as the lease's value (who is active).
    pub instance: String,
    /// Replicas of the lease bucket's stream when this instance creates it: 3 on a 3-node
    /// cluster, or losing the one node that holds it leaves no instance able to lead.
    pub replicas: usize,
}

/// Waits until this instance holds the lease. Every failure (the key is held, NATS is
/// unreachable, the bucket is not there yet) is retried with a pause of TTL/6 clamped to
/// [50 ms, 1 s], so a standby takes over at most that long after the key expires.
pub async fn acquire(js: Context, cfg: LeaseConfig) -> Lease {
    let pause = (cfg.ttl / 6).clamp(MIN_RETRY, MAX_RETRY);
    let mut told_standby = false;
    loop {
        match timeout(MAX_OP_TIMEOUT, try_acquire(&js, &cfg)).await {
            Ok(Ok(Some(lease))) => {
                info!(instance = %cfg.instance, bucket = %cfg.bucket, "Took the leader lease.");
                return lease;
            }
            Ok(Ok(None)) if !told_standby => {
                told_standby = true;
                info!(instance = %cfg.instance, "Another scheduler is active; standing by.");
            }
            Ok(Ok(None)) => {}
            Ok(Err(err)) => warn!(%err, "Taking the leader lease failed; retrying."),
            Err(_) => warn!("Taking the leader lease timed out; retrying."),
        }
        sleep(pause).await;
    }
}

/// One attempt: `Some` if we took the key, `None` if someone else holds it.
async fn try_acquire(js: &Context, cfg: &LeaseConfig) -> Result<Option<Lease>, LeaseError> {
    let bucket = Bucket::open(
        js,
        &BucketConfig {
            bucket: cfg.bucket.clone(),
            description: "scheduler leader lease".to_owned(),
            ttl: cfg.ttl,
            replicas: cfg.replicas,
        },
    )
    .await?;
    let name = Bytes::copy_from_slice(cfg.instance.as_bytes());
    let lease = bucket.create(KEY, &name).await?;
    if lease.is_none()
        && let Ok(Some((holder, _))) = bucket.live(KEY).await
    {
        let holder = String::from_utf8_lossy(&holder);
        debug!(%holder, "Leader lease is held.");
    }
    Ok(lease)
}

/// Refreshes a held lease on the runtime it was spawned on, reports its loss once, and
/// deletes the key on [`Keeper::release`]. Dropping it abandons the lease (it expires).
#[derive(Debug)]
pub struct Keeper {
    lost: Option<oneshot::Receiver<()>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Keeper {
    /// Starts refreshing `lease` on `runtime`.
    pub fn spawn(runtime: &tokio::runtime::Handle, lease: Lease) -> Self {
        let (lost_tx, lost) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel();
        let task = runtime.spawn(hold(lease, stop_rx, lost_tx));
        Keeper {
            lost: Some(lost),
            stop,
            task,
        }
    }

    /// Completes when the lease is lost (a refresh found someone else's revision, or none
    /// succeeded within the TTL). Completes at once if called again after that.
    pub async fn lost(&mut self) {
        if let Some(lost) = self.lost.as_mut() {
            // An error means the keeper task ended without saying: treat it as lost too,
            // since nobody refreshes any more.
            let _ = lost.await;
            self.lost = None;
        }
    }

    /// Stops refreshing and deletes the key if it still holds our lease, so a standby can
    /// take over at once. Waits for the keeper task (a few seconds at most).
    pub async fn release(self) {
        let _ = self.stop.send(());
        if let Err(err) = self.task.await {
            warn!(%err, "Lease keeper task failed.");
        }
    }
}

async fn hold(mut lease: Lease, mut stop: oneshot::Receiver<()>, lost: oneshot::Sender<()>) {
    match lease.hold(&mut stop).await {
        Held::Lost => {
            warn!("Leader lease lost.");
            let _ = lost.send(());
        }
        Held::StopRequested => lease.release().await,
        Held::Abandoned => {}
    }
}
