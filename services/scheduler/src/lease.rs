//! The leader lease: only one scheduler is active at a time.
//!
//! The lease is one key ([`KEY`]) in a JetStream key-value bucket whose `max_age` is the
//! lease TTL. [`acquire`] takes it with an atomic create (a write that only succeeds when
//! the key has no live value), retrying until it does: that is the standby's wait. The
//! holder then runs a [`Keeper`], which refreshes the key every TTL/3 with a
//! compare-and-set on the revision its last write produced, so a refresh can never
//! overwrite a lease someone else took after ours expired.
//!
//! The keeper declares the lease lost one TTL after the *sending* of the last refresh that
//! succeeded. The server cannot expire that refresh earlier, so the old holder gives up no
//! later than a standby can take over (as long as the server's clock does not jump
//! forward). Losing the lease is final for this process: [`crate::run`] stops with
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
use async_nats::jetstream::context::{CreateKeyValueError, CreateKeyValueErrorKind};
use async_nats::jetstream::kv::{
    self, CreateError, CreateErrorKind, EntryError, Operation, StatusError, UpdateError,
    UpdateErrorKind,
};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

/// Bucket the lease lives in unless configured otherwise.
pub const DEFAULT_BUCKET: &str = "scheduler_leader";
/// The one key in the bucket.
pub const KEY: &str = "leader";
/// Lease TTL unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// Upper bound on one request, so a hung request cannot outlive the lease it extends.
const MAX_OP_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

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
}

/// Why the lease could not be taken, refreshed or released.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The bucket could neither be created nor opened.
    #[error("opening lease bucket {bucket}: {source}")]
    Bucket {
        /// Bucket name.
        bucket: String,
        /// Why the create failed.
        #[source]
        source: CreateKeyValueError,
    },
    /// The bucket's settings could not be read.
    #[error("reading lease bucket settings: {0}")]
    Status(#[source] StatusError),
    /// Creating the key failed for a reason other than it being held.
    #[error("creating the leader key: {0}")]
    Create(#[source] CreateError),
    /// A compare-and-set write failed for a reason other than a revision mismatch.
    #[error("writing the leader key: {0}")]
    Write(#[source] UpdateError),
    /// Reading the key failed.
    #[error("reading the leader key: {0}")]
    Read(#[source] EntryError),
}

/// A held lease: the revision our last write gave the key, and when that write was sent.
#[derive(Debug)]
pub struct Lease {
    revision: u64,
    /// The shorter of the configured TTL and the bucket's `max_age`: the bucket may have
    /// been created by an instance configured differently, and its `max_age` is what
    /// actually expires the key.
    ttl: Duration,
    sent_at: Instant,
    name: Bytes,
    /// Boxed because the handle carries the whole stream info (over a kilobyte).
    kv: Box<kv::Store>,
}

impl Lease {
    /// The TTL in force.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
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
    let kv = Box::new(open_bucket(js, cfg).await?);
    let ttl = effective_ttl(&kv, cfg).await?;
    let name = Bytes::copy_from_slice(cfg.instance.as_bytes());
    let sent_at = Instant::now();
    match kv.create(KEY, name.clone()).await {
        Ok(revision) => Ok(Some(Lease {
            revision,
            ttl,
            sent_at,
            name,
            kv,
        })),
        Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {
            if let Ok(Some(entry)) = kv.entry(KEY).await {
                let holder = String::from_utf8_lossy(&entry.value);
                debug!(%holder, "Leader lease is held.");
            }
            Ok(None)
        }
        Err(err) => Err(LeaseError::Create(err)),
    }
}

/// Creates the bucket, or opens it if it exists (possibly with another `max_age`, which
/// [`effective_ttl`] accounts for).
async fn open_bucket(js: &Context, cfg: &LeaseConfig) -> Result<kv::Store, LeaseError> {
    let config = kv::Config {
        bucket: cfg.bucket.clone(),
        description: "scheduler leader lease".to_owned(),
        history: 1,
        max_age: cfg.ttl,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(kv) => Ok(kv),
        Err(err) if err.kind() == CreateKeyValueErrorKind::BucketCreate => js
            .get_key_value(cfg.bucket.as_str())
            .await
            // The create error says more (no JetStream, no resources, ...).
            .map_err(|_| LeaseError::Bucket {
                bucket: cfg.bucket.clone(),
                source: err,
            }),
        Err(source) => Err(LeaseError::Bucket {
            bucket: cfg.bucket.clone(),
            source,
        }),
    }
}

async fn effective_ttl(kv: &kv::Store, cfg: &LeaseConfig) -> Result<Duration, LeaseError> {
    let status = kv.status().await.map_err(LeaseError::Status)?;
    let max_age = status.info.config.max_age;
    if max_age.is_zero() {
        warn!(bucket = %cfg.bucket, "Lease bucket has no max_age; a dead leader's lease never expires.");
        return Ok(cfg.ttl);
    }
    if max_age != cfg.ttl {
        warn!(bucket = %cfg.bucket, ?max_age, ttl = ?cfg.ttl, "Lease bucket max_age is not the ttl; using the shorter.");
    }
    Ok(max_age.min(cfg.ttl))
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
    let period = lease.ttl / 3;
    let retry = (lease.ttl / 10).clamp(MIN_RETRY, MAX_RETRY);
    let mut next = lease.sent_at + period;
    loop {
        let deadline = lease.sent_at + lease.ttl;
        tokio::select! {
            stop = &mut stop => {
                // A closed channel means the keeper was dropped: abandon the lease and let
                // it expire rather than delete it behind the owner's back.
                if stop.is_ok() {
                    release(&lease).await;
                }
                return;
            }
            () = sleep_until(next.min(deadline)) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            warn!(ttl = ?lease.ttl, "No refresh succeeded within the ttl; leader lease lost.");
            let _ = lost.send(());
            return;
        }
        let limit = op_timeout(lease.ttl).min(deadline.saturating_duration_since(now));
        match timeout(limit, refresh(&lease)).await {
            Ok(Ok(Some((revision, sent_at)))) => {
                lease.revision = revision;
                lease.sent_at = sent_at;
                next = sent_at + period;
            }
            Ok(Ok(None)) => {
                warn!("Leader lease taken over by another instance.");
                let _ = lost.send(());
                return;
            }
            Ok(Err(err)) => {
                warn!(%err, "Leader lease refresh failed; retrying.");
                next = Instant::now() + retry;
            }
            Err(_) => {
                warn!(?limit, "Leader lease refresh timed out; retrying.");
                next = Instant::now() + retry;
            }
        }
    }
}

/// One compare-and-set refresh: `Some((revision, sent_at))` while we hold the key, `None`
/// once someone else does.
async fn refresh(lease: &Lease) -> Result<Option<(u64, Instant)>, LeaseError> {
    let sent_at = Instant::now();
    match lease
        .kv
        .update(KEY, lease.name.clone(), lease.revision)
        .await
    {
        Ok(revision) => return Ok(Some((revision, sent_at))),
        Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
        Err(err) => return Err(LeaseError::Write(err)),
    }
    // A refresh that timed out on our side may have landed after all, leaving our name
    // under a revision we never saw; anything else means the lease is gone.
    let Some(current) = revision_if_ours(lease).await? else {
        return Ok(None);
    };
    let sent_at = Instant::now();
    match lease.kv.update(KEY, lease.name.clone(), current).await {
        Ok(revision) => Ok(Some((revision, sent_at))),
        Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
        Err(err) => Err(LeaseError::Write(err)),
    }
}

/// Deletes the key if it still holds our lease; a failure only delays a takeover by the
/// rest of the TTL.
async fn release(lease: &Lease) {
    let attempt = async {
        match lease
            .kv
            .delete_expect_revision(KEY, Some(lease.revision))
            .await
        {
            Ok(()) => return Ok(true),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(err) => return Err(LeaseError::Write(err)),
        }
        let Some(current) = revision_if_ours(lease).await? else {
            return Ok(false);
        };
        match lease.kv.delete_expect_revision(KEY, Some(current)).await {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(err) => Err(LeaseError::Write(err)),
        }
    };
    match timeout(op_timeout(lease.ttl), attempt).await {
        Ok(Ok(true)) => info!("Released the leader lease."),
        Ok(Ok(false)) => debug!("The leader lease was no longer ours to release."),
        Ok(Err(err)) => warn!(%err, "Releasing the leader lease failed; it expires on its own."),
        Err(_) => warn!("Releasing the leader lease timed out; it expires on its own."),
    }
}

async fn revision_if_ours(lease: &Lease) -> Result<Option<u64>, LeaseError> {
    let entry = lease.kv.entry(KEY).await.map_err(LeaseError::Read)?;
    Ok(entry
        .filter(|e| e.operation == Operation::Put && e.value == lease.name)
        .map(|e| e.revision))
}

fn op_timeout(ttl: Duration) -> Duration {
    (ttl / 3).min(MAX_OP_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeouts_stay_within_a_refresh_period() {
        assert_eq!(op_timeout(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(op_timeout(Duration::from_secs(60)), MAX_OP_TIMEOUT);
    }
}
