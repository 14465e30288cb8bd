//! Worker-id leases. Every gateway replica stamps a 10-bit worker id into the Snowflake
//! socket ids it mints; this module owns how a replica gets one that no other live replica
//! holds. Ids are leased from a JetStream key-value bucket (`worker.<id>` → the replica's
//! instance name): [`acquire`] takes one, and [`LeaseKeeper`] keeps it refreshed, reports
//! when it is lost, re-acquires one and deletes it on [`LeaseKeeper::release`].
//!
//! The lease mechanism (bucket, compare-and-set refreshes, loss one TTL after the last
//! good refresh was sent, release) is [`servicekit::lease`]'s; this module is the worker-id
//! policy on top: which key to take, reclaiming our own, and seeking a new id after a loss.
//! Because a lease is declared lost before the server can expire it, a replica stops
//! minting before anyone else can take its id (as long as the server's clock does not jump
//! forward).
//!
//! A lease holding our instance name is treated as ours: that is what gives a restarted
//! replica its old id back, and it means instance names must be unique among live replicas.
//! An id freed by a release can be taken at once by another replica, so ids stay unique
//! across that hand-over only if the two replicas' clocks differ by less than the time
//! between the release and the newcomer's first id.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{WatchError, WatcherError};
use bytes::Bytes;
use futures_util::StreamExt;
use messages::GatewayId;
use messages::snowflake::MAX_WORKER;
use servicekit::lease::{
    self as core, Bucket, BucketConfig, Held, MAX_OP_TIMEOUT, MAX_RETRY, MIN_RETRY,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

/// Bucket the leases live in unless configured otherwise.
pub const DEFAULT_BUCKET: &str = "ws_gateway_workers";
/// Lease TTL unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

const KEY_PREFIX: &str = "worker.";
/// How long [`acquire`] keeps retrying transient failures.
// Three JetStream request timeouts (5 s each). It was 5 s, one request timeout, so a
// single slow request used the whole budget; the lease test failed once on a loaded
// machine (error not captured), which this may explain.
pub const ACQUIRE_RETRY_FOR: Duration = Duration::from_secs(15);

/// Where and how a replica leases its worker id.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Key-value bucket holding the leases.
    pub bucket: String,
    /// How long a lease lives without a refresh; also the bucket's `max_age` when this
    /// replica creates the bucket.
    pub ttl: Duration,
    /// Bucket replicas when this replica creates it (1 for a single server, 3 for a
    /// cluster that should survive the loss of a node).
    pub replicas: usize,
    /// This replica's stable name, stored as the lease's value.
    pub instance: GatewayId,
}

impl LeaseConfig {
    /// Defaults ([`DEFAULT_BUCKET`], [`DEFAULT_TTL`], one replica) for `instance`.
    pub fn new(instance: GatewayId) -> Self {
        LeaseConfig {
            bucket: DEFAULT_BUCKET.to_owned(),
            ttl: DEFAULT_TTL,
            replicas: 1,
            instance,
        }
    }

    fn bucket_config(&self) -> BucketConfig {
        BucketConfig {
            bucket: self.bucket.clone(),
            description: "ws-gateway Snowflake worker-id leases".to_owned(),
            ttl: self.ttl,
            replicas: self.replicas,
        }
    }
}

/// Why no lease could be taken (or kept, or released).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A zero TTL would make every lease expire as soon as it is written.
    #[error("lease ttl must be longer than zero")]
    ZeroTtl,
    /// The lease mechanism failed (bucket, read, write).
    #[error(transparent)]
    Kv(#[from] core::LeaseError),
    /// Listing the leased ids could not start.
    #[error("listing worker leases: {0}")]
    List(#[source] WatchError),
    /// Listing the leased ids failed part way.
    #[error("listing worker leases: {0}")]
    ListEntry(#[source] WatcherError),
    /// Every worker id is leased by someone else.
    #[error("all {} worker ids in bucket {bucket} are taken", u32::from(MAX_WORKER) + 1)]
    AllTaken {
        /// Bucket name.
        bucket: String,
    },
}

impl LeaseError {
    /// Whether trying again may help: everything but a bad configuration or a full bucket.
    fn is_transient(&self) -> bool {
        match self {
            LeaseError::ZeroTtl | LeaseError::AllTaken { .. } => false,
            LeaseError::Kv(err) => err.is_transient(),
            LeaseError::List(_) | LeaseError::ListEntry(_) => true,
        }
    }
}

/// A held worker id.
#[derive(Debug)]
pub struct Lease {
    worker: u16,
    inner: core::Lease,
}

impl Lease {
    /// The leased Snowflake worker id (`0..=MAX_WORKER`).
    pub fn worker_id(&self) -> u16 {
        self.worker
    }

    /// The lease's key in the bucket (`worker.<id>`).
    pub fn key(&self) -> String {
        worker_key(self.worker)
    }

    /// The key's revision after our last write.
    pub fn revision(&self) -> u64 {
        self.inner.revision()
    }

    /// The TTL in force for this lease.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl()
    }
}

/// Leases a worker id: the one already holding `cfg.instance` if there is one (a restart
/// that did not release), otherwise the first free id from a random starting point.
///
/// Transient NATS failures are retried for up to [`ACQUIRE_RETRY_FOR`]; wrap the call in a
/// timeout to bound it more tightly (NATS requests themselves may take seconds to time out).
pub async fn acquire(js: &Context, cfg: &LeaseConfig) -> Result<Lease, LeaseError> {
    // Right after a clustered bucket is created its stream may have no leader yet, and
    // writes fail with "no responders" until one is elected; leader changes later do the
    // same. Each retry scans again, so it also reclaims a lease that a failed attempt
    // wrote under our name without hearing back.
    let give_up = Instant::now() + ACQUIRE_RETRY_FOR;
    let mut pause = MIN_RETRY;
    loop {
        // Boxed: one attempt's future is several kilobytes, and callers join several.
        match Box::pin(try_acquire(js, cfg)).await {
            Ok(lease) => return Ok(lease),
            Err(err) if !err.is_transient() || Instant::now() + pause >= give_up => {
                return Err(err);
            }
            Err(err) => debug!(%err, ?pause, "leasing a worker id failed; retrying"),
        }
        sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}

/// One attempt at [`acquire`].
async fn try_acquire(js: &Context, cfg: &LeaseConfig) -> Result<Lease, LeaseError> {
    if cfg.ttl.is_zero() {
        return Err(LeaseError::ZeroTtl);
    }
    let bucket = Bucket::open(js, &cfg.bucket_config()).await?;
    let name = instance_value(&cfg.instance);
    let scan = scan(&bucket, &name).await?;

    for (worker, revision) in scan.ours {
        // `None`: written since the scan, so it expired and someone else took it.
        if let Some(inner) = bucket.reclaim(&worker_key(worker), &name, revision).await? {
            info!(worker, bucket = %cfg.bucket, "reclaimed worker id");
            return Ok(Lease { worker, inner });
        }
    }

    // A random start spreads concurrent starters over the id space, so they rarely race
    // for the same key.
    let slots = MAX_WORKER + 1;
    let offset = rand::random_range(0..slots);
    for step in 0..slots {
        let worker = (offset + step) % slots;
        if scan.taken.contains(&worker) {
            continue;
        }
        if let Some(inner) = bucket.create(&worker_key(worker), &name).await? {
            info!(worker, bucket = %cfg.bucket, "leased worker id");
            return Ok(Lease { worker, inner });
        }
    }
    Err(LeaseError::AllTaken {
        bucket: cfg.bucket.clone(),
    })
}

/// A task that keeps a [`Lease`] alive: it refreshes it every TTL/3, reports `None` when
/// the lease is lost (someone else owns the key, or no refresh succeeded for a TTL), then
/// keeps trying to lease an id again and reports the new one.
///
/// Dropping the keeper stops the task without deleting the key, so the lease expires after
/// its TTL; [`LeaseKeeper::release`] deletes it at once.
#[derive(Debug)]
pub struct LeaseKeeper {
    state: watch::Receiver<Option<u16>>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts keeping `lease` (from [`acquire`] with the same `js` and `cfg`) on the
    /// current Tokio runtime.
    pub fn spawn(js: Context, cfg: LeaseConfig, lease: Lease) -> Self {
        let (state_tx, state) = watch::channel(Some(lease.worker));
        let (shutdown, shutdown_rx) = oneshot::channel();
        let keeper = Keeper {
            js,
            cfg,
            state: state_tx,
        };
        let task = tokio::spawn(keeper.run(lease, shutdown_rx));
        LeaseKeeper {
            state,
            shutdown,
            task,
        }
    }

    /// The worker id while the lease is held, `None` while it is lost (or after the keeper
    /// stopped). Whoever mints ids must stop while it reads `None`, and mint with a new
    /// generator when a different id comes back.
    pub fn watch(&self) -> watch::Receiver<Option<u16>> {
        self.state.clone()
    }

    /// The current state, as [`LeaseKeeper::watch`] reports it.
    pub fn worker_id(&self) -> Option<u16> {
        *self.state.borrow()
    }

    /// Stops the keeper and deletes the key if it still holds our lease. Watchers see
    /// `None` before the key is deleted. Takes up to a few seconds when NATS is
    /// unreachable, since an attempt in flight is allowed to finish.
    pub async fn release(self) {
        // A send error means the task has already ended; awaiting it below is still right.
        let _ = self.shutdown.send(());
        if let Err(err) = self.task.await {
            warn!(%err, "lease keeper task failed");
        }
    }
}

/// What the keeper does next.
enum Next {
    Hold(Lease),
    Seek,
    Stop,
}

struct Keeper {
    js: Context,
    cfg: LeaseConfig,
    state: watch::Sender<Option<u16>>,
}

impl Keeper {
    async fn run(self, lease: Lease, mut shutdown: oneshot::Receiver<()>) {
        let mut next = Next::Hold(lease);
        loop {
            next = match next {
                Next::Hold(lease) => self.hold(lease, &mut shutdown).await,
                Next::Seek => self.seek(&mut shutdown).await,
                Next::Stop => break,
            };
        }
        self.report(None);
    }

    fn report(&self, worker: Option<u16>) {
        self.state.send_if_modified(|state| {
            let changed = *state != worker;
            *state = worker;
            changed
        });
    }

    /// Refreshes `lease` until it is lost or the keeper is told to stop.
    async fn hold(&self, mut lease: Lease, shutdown: &mut oneshot::Receiver<()>) -> Next {
        self.report(Some(lease.worker));
        match lease.inner.hold(shutdown).await {
            Held::Lost => {
                warn!(worker = lease.worker, "worker id lost");
                Next::Seek
            }
            Held::StopRequested => {
                // Watchers stop minting before the id is free for someone else.
                self.report(None);
                lease.inner.release().await;
                Next::Stop
            }
            Held::Abandoned => {
                self.report(None);
                Next::Stop
            }
        }
    }

    /// Tries to lease an id again, with growing pauses, until it succeeds or the keeper is
    /// told to stop.
    async fn seek(&self, shutdown: &mut oneshot::Receiver<()>) -> Next {
        self.report(None);
        // Leasing scans the whole bucket; back off so a full bucket is not scanned in a
        // tight loop.
        let max_pause = (self.cfg.ttl / 3).max(MIN_RETRY);
        let mut pause = core::retry_delay(self.cfg.ttl);
        let mut next = Instant::now();
        loop {
            tokio::select! {
                // Nothing is held, so there is nothing to delete.
                _ = &mut *shutdown => return Next::Stop,
                () = sleep_until(next) => {}
            }
            // One attempt at a time: this loop does its own retrying, and stays responsive
            // to shutdown between attempts.
            let attempt = Box::pin(try_acquire(&self.js, &self.cfg));
            match timeout(self.cfg.ttl.max(MAX_OP_TIMEOUT), attempt).await {
                Ok(Ok(lease)) => return Next::Hold(lease),
                Ok(Err(err)) => warn!(%err, "leasing a worker id failed; retrying"),
                Err(_) => warn!("leasing a worker id timed out; retrying"),
            }
            next = Instant::now() + pause;
            pause = (pause * 2).min(max_pause);
        }
    }
}

/// What the bucket says right now.
#[derive(Default)]
struct Scan {
    /// Ids holding our instance name, with their revisions.
    ours: Vec<(u16, u64)>,
    /// Ids with a live value (ours included).
    taken: HashSet<u16>,
}

async fn scan(bucket: &Bucket, name: &Bytes) -> Result<Scan, LeaseError> {
    let mut keys = bucket.store().keys().await.map_err(LeaseError::List)?;
    let mut workers = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(LeaseError::ListEntry)?;
        // Keys that are not leases (someone else's use of the bucket) are not ours to judge.
        if let Some(worker) = parse_worker_key(&key) {
            workers.push(worker);
        }
    }
    let mut scan = Scan::default();
    for worker in workers {
        // Anything but a live value means deleted or expired since the listing: free.
        if let Some((value, revision)) = bucket.live(&worker_key(worker)).await? {
            scan.taken.insert(worker);
            if value == *name {
                scan.ours.push((worker, revision));
            }
        }
    }
    Ok(scan)
}

fn instance_value(instance: &GatewayId) -> Bytes {
    Bytes::copy_from_slice(instance.as_str().as_bytes())
}

fn worker_key(worker: u16) -> String {
    format!("{KEY_PREFIX}{worker}")
}

/// The worker id in a lease key; `None` for anything else, including non-canonical
/// spellings like `worker.007`, which this module never writes.
fn parse_worker_key(key: &str) -> Option<u16> {
    let worker: u16 = key.strip_prefix(KEY_PREFIX)?.parse().ok()?;
    (worker <= MAX_WORKER && worker_key(worker) == key).then_some(worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_keys_round_trip() {
        assert_eq!(worker_key(0), "worker.0");
        assert_eq!(parse_worker_key("worker.1023"), Some(1023));
        assert_eq!(parse_worker_key("worker.1024"), None);
        assert_eq!(parse_worker_key("worker.007"), None);
        assert_eq!(parse_worker_key("worker.x"), None);
        assert_eq!(parse_worker_key("other.5"), None);
    }
}
