//! Worker-id leases. Every gateway replica stamps a 10-bit worker id into the Snowflake
//! socket ids it mints; this module owns how a replica gets one that no other live replica
//! holds. Ids are leased from a JetStream key-value bucket (`worker.<id>` → the replica's
//! instance name): [`acquire`] takes one, and [`LeaseKeeper`] keeps it refreshed, reports
//! when it is lost, re-acquires one and deletes it on [`LeaseKeeper::release`].
//!
//! Exclusivity rests on the server: a key is only created when it has no live value
//! (a compare on the key's last revision), and every write after that compares on the
//! revision too. The bucket's `max_age` is the lease TTL, so a lease nobody refreshes
//! disappears. The keeper declares its lease lost one TTL after the *sending* of the last
//! refresh that succeeded, which is never later than the server expires that refresh, so a
//! replica stops minting before anyone else can take its id (as long as the server's clock
//! does not jump forward).
//!
//! A lease holding our instance name is treated as ours: that is what gives a restarted
//! replica its old id back, and it means instance names must be unique among live replicas.
//! An id freed by a release can be taken at once by another replica, so ids stay unique
//! across that hand-over only if the two replicas' clocks differ by less than the time
//! between the release and the newcomer's first id.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::context::{CreateKeyValueError, CreateKeyValueErrorKind};
use async_nats::jetstream::kv::{
    self, CreateError, CreateErrorKind, EntryError, Operation, StatusError, UpdateError,
    UpdateErrorKind, WatchError, WatcherError,
};
use bytes::Bytes;
use futures_util::StreamExt;
use messages::GatewayId;
use messages::snowflake::MAX_WORKER;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

/// Bucket the leases live in unless configured otherwise.
pub const DEFAULT_BUCKET: &str = "ws_gateway_workers";
/// Lease TTL unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

const KEY_PREFIX: &str = "worker.";
/// Upper bound on one refresh or delete round trip, so a hung request cannot outlive the
/// lease it is meant to extend.
const MAX_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`acquire`] keeps retrying transient failures.
// Three JetStream request timeouts (5 s each). It was 5 s, one request timeout, so a
// single slow request used the whole budget; the lease test failed once on a loaded
// machine (error not captured), which this may explain.
pub const ACQUIRE_RETRY_FOR: Duration = Duration::from_secs(15);
const MIN_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

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
}

/// Why no lease could be taken (or kept, or released).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A zero TTL would make every lease expire as soon as it is written.
    #[error("lease ttl must be longer than zero")]
    ZeroTtl,
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
    #[error("reading lease bucket {bucket} settings: {source}")]
    Status {
        /// Bucket name.
        bucket: String,
        /// The underlying error.
        #[source]
        source: StatusError,
    },
    /// Listing the leased ids could not start.
    #[error("listing worker leases: {0}")]
    List(#[source] WatchError),
    /// Listing the leased ids failed part way.
    #[error("listing worker leases: {0}")]
    ListEntry(#[source] WatcherError),
    /// Reading one lease failed.
    #[error("reading {key}: {source}")]
    Read {
        /// The lease key.
        key: String,
        /// The underlying error.
        #[source]
        source: EntryError,
    },
    /// A compare-and-swap write (reclaim, refresh or delete) failed for a reason other
    /// than a revision mismatch.
    #[error("writing {key}: {source}")]
    Write {
        /// The lease key.
        key: String,
        /// The underlying error.
        #[source]
        source: UpdateError,
    },
    /// Creating a lease failed for a reason other than the id being taken.
    #[error("creating {key}: {source}")]
    Create {
        /// The lease key.
        key: String,
        /// The underlying error.
        #[source]
        source: CreateError,
    },
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
            LeaseError::Bucket { source, .. } => !matches!(
                source.kind(),
                CreateKeyValueErrorKind::InvalidStoreName | CreateKeyValueErrorKind::TooLongHistory
            ),
            _ => true,
        }
    }
}

/// A held worker id: the key and the revision our last write gave it.
#[derive(Debug)]
pub struct Lease {
    worker: u16,
    revision: u64,
    /// The shorter of the configured TTL and the bucket's `max_age`: the bucket may have
    /// been created by a replica configured differently, and its `max_age` is what
    /// actually expires the lease.
    ttl: Duration,
    /// When the write that produced `revision` was sent; the server cannot expire that
    /// write before `sent_at + ttl`.
    sent_at: Instant,
    /// Boxed because the handle carries the whole stream info (over a kilobyte).
    kv: Box<kv::Store>,
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
        self.revision
    }

    /// The TTL in force for this lease.
    pub fn ttl(&self) -> Duration {
        self.ttl
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
    let kv = Box::new(open_bucket(js, cfg).await?);
    let ttl = effective_ttl(&kv, cfg).await?;
    let name = instance_value(&cfg.instance);
    let scan = scan(&kv, &name).await?;

    for (worker, revision) in scan.ours {
        let key = worker_key(worker);
        let sent_at = Instant::now();
        match kv.update(&key, name.clone(), revision).await {
            Ok(revision) => {
                info!(worker, bucket = %cfg.bucket, "reclaimed worker id");
                return Ok(Lease {
                    worker,
                    revision,
                    ttl,
                    sent_at,
                    kv,
                });
            }
            // Written since the scan, so it expired and someone else took it.
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(source) => return Err(LeaseError::Write { key, source }),
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
        let key = worker_key(worker);
        let sent_at = Instant::now();
        match kv.create(&key, name.clone()).await {
            Ok(revision) => {
                info!(worker, bucket = %cfg.bucket, "leased worker id");
                return Ok(Lease {
                    worker,
                    revision,
                    ttl,
                    sent_at,
                    kv,
                });
            }
            Err(err) if err.kind() == CreateErrorKind::AlreadyExists => {}
            Err(source) => return Err(LeaseError::Create { key, source }),
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
            name: instance_value(&cfg.instance),
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
    name: Bytes,
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
        let key = lease.key();
        let period = lease.ttl / 3;
        let retry = retry_delay(lease.ttl);
        let mut next = lease.sent_at + period;
        loop {
            let deadline = lease.sent_at + lease.ttl;
            tokio::select! {
                stop = &mut *shutdown => {
                    self.report(None);
                    // A closed channel means the keeper handle was dropped: abandon the
                    // lease and let it expire.
                    if stop.is_ok() {
                        self.release(&lease, &key).await;
                    }
                    return Next::Stop;
                }
                () = sleep_until(next.min(deadline)) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let worker = lease.worker;
                warn!(worker, ttl = ?lease.ttl, "no refresh succeeded within the ttl; lease lost");
                return Next::Seek;
            }
            let limit = op_timeout(lease.ttl).min(deadline.saturating_duration_since(now));
            match timeout(limit, self.refresh(&lease, &key)).await {
                Ok(Ok(Some((revision, sent_at)))) => {
                    lease.revision = revision;
                    lease.sent_at = sent_at;
                    next = sent_at + period;
                }
                Ok(Ok(None)) => {
                    warn!(
                        worker = lease.worker,
                        "lease taken over by someone else; worker id lost"
                    );
                    return Next::Seek;
                }
                Ok(Err(err)) => {
                    warn!(worker = lease.worker, %err, "lease refresh failed; retrying");
                    next = Instant::now() + retry;
                }
                Err(_) => {
                    warn!(
                        worker = lease.worker,
                        ?limit,
                        "lease refresh timed out; retrying"
                    );
                    next = Instant::now() + retry;
                }
            }
        }
    }

    /// One refresh: `Some((revision, sent_at))` if we still hold the key, `None` if someone
    /// else does.
    async fn refresh(
        &self,
        lease: &Lease,
        key: &str,
    ) -> Result<Option<(u64, Instant)>, LeaseError> {
        let sent_at = Instant::now();
        match lease
            .kv
            .update(key, self.name.clone(), lease.revision)
            .await
        {
            Ok(revision) => return Ok(Some((revision, sent_at))),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(source) => {
                return Err(LeaseError::Write {
                    key: key.to_owned(),
                    source,
                });
            }
        }
        // An earlier refresh that timed out on our side may have landed after all,
        // leaving our name under a revision we never saw.
        let Some(current) = revision_if_ours(&lease.kv, key, &self.name).await? else {
            return Ok(None);
        };
        let sent_at = Instant::now();
        match lease.kv.update(key, self.name.clone(), current).await {
            Ok(revision) => {
                debug!(
                    worker = lease.worker,
                    "lease refreshed at a revision we had missed"
                );
                Ok(Some((revision, sent_at)))
            }
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(source) => Err(LeaseError::Write {
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// Deletes the key if it still holds our lease; failures only cost the id staying
    /// taken until the lease expires.
    async fn release(&self, lease: &Lease, key: &str) {
        match timeout(op_timeout(lease.ttl), self.delete_if_ours(lease, key)).await {
            Ok(Ok(true)) => info!(worker = lease.worker, "released worker id"),
            Ok(Ok(false)) => debug!(worker = lease.worker, "lease was no longer ours to release"),
            Ok(Err(err)) => {
                warn!(worker = lease.worker, %err, "release failed; the lease expires on its own");
            }
            Err(_) => warn!(
                worker = lease.worker,
                "releasing worker id timed out; it expires with the ttl"
            ),
        }
    }

    async fn delete_if_ours(&self, lease: &Lease, key: &str) -> Result<bool, LeaseError> {
        let write_error = |source| LeaseError::Write {
            key: key.to_owned(),
            source,
        };
        match lease
            .kv
            .delete_expect_revision(key, Some(lease.revision))
            .await
        {
            Ok(()) => return Ok(true),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(source) => return Err(write_error(source)),
        }
        // As in `refresh`: a timed-out refresh may have moved the revision on.
        let Some(current) = revision_if_ours(&lease.kv, key, &self.name).await? else {
            return Ok(false);
        };
        match lease.kv.delete_expect_revision(key, Some(current)).await {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(source) => Err(write_error(source)),
        }
    }

    /// Tries to lease an id again, with growing pauses, until it succeeds or the keeper is
    /// told to stop.
    async fn seek(&self, shutdown: &mut oneshot::Receiver<()>) -> Next {
        self.report(None);
        // Leasing scans the whole bucket; back off so a full bucket is not scanned in a
        // tight loop.
        let max_pause = (self.cfg.ttl / 3).max(MIN_RETRY);
        let mut pause = retry_delay(self.cfg.ttl);
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

/// Creates the bucket, or opens it if it exists (possibly with other settings, which
/// [`effective_ttl`] accounts for).
async fn open_bucket(js: &Context, cfg: &LeaseConfig) -> Result<kv::Store, LeaseError> {
    let config = kv::Config {
        bucket: cfg.bucket.clone(),
        description: "ws-gateway Snowflake worker-id leases".to_owned(),
        history: 1,
        max_age: cfg.ttl,
        num_replicas: cfg.replicas.max(1),
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(kv) => Ok(kv),
        Err(err) if err.kind() == CreateKeyValueErrorKind::BucketCreate => {
            match js.get_key_value(cfg.bucket.as_str()).await {
                Ok(kv) => Ok(kv),
                Err(get_err) => {
                    // The create error says more (no JetStream, no resources, ...).
                    debug!(%get_err, "opening existing lease bucket failed too");
                    Err(LeaseError::Bucket {
                        bucket: cfg.bucket.clone(),
                        source: err,
                    })
                }
            }
        }
        Err(source) => Err(LeaseError::Bucket {
            bucket: cfg.bucket.clone(),
            source,
        }),
    }
}

async fn effective_ttl(kv: &kv::Store, cfg: &LeaseConfig) -> Result<Duration, LeaseError> {
    let status = kv.status().await.map_err(|source| LeaseError::Status {
        bucket: cfg.bucket.clone(),
        source,
    })?;
    let max_age = status.info.config.max_age;
    if max_age.is_zero() {
        let bucket = &cfg.bucket;
        warn!(%bucket, "lease bucket has no max_age; abandoned leases never expire");
        return Ok(cfg.ttl);
    }
    if max_age != cfg.ttl {
        let (bucket, ttl) = (&cfg.bucket, cfg.ttl);
        warn!(%bucket, ?max_age, ?ttl, "lease bucket max_age is not the ttl; using the shorter");
    }
    Ok(max_age.min(cfg.ttl))
}

/// What the bucket says right now.
#[derive(Default)]
struct Scan {
    /// Ids holding our instance name, with their revisions.
    ours: Vec<(u16, u64)>,
    /// Ids with a live value (ours included).
    taken: HashSet<u16>,
}

async fn scan(kv: &kv::Store, name: &Bytes) -> Result<Scan, LeaseError> {
    let mut keys = kv.keys().await.map_err(LeaseError::List)?;
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
        let key = worker_key(worker);
        let entry = kv
            .entry(key.as_str())
            .await
            .map_err(|source| LeaseError::Read { key, source })?;
        // Anything but a live value means deleted or expired since the listing: free.
        if let Some(entry) = entry.filter(|e| e.operation == Operation::Put) {
            scan.taken.insert(worker);
            if entry.value == *name {
                scan.ours.push((worker, entry.revision));
            }
        }
    }
    Ok(scan)
}

async fn revision_if_ours(
    kv: &kv::Store,
    key: &str,
    name: &Bytes,
) -> Result<Option<u64>, LeaseError> {
    let entry = kv.entry(key).await.map_err(|source| LeaseError::Read {
        key: key.to_owned(),
        source,
    })?;
    Ok(entry
        .filter(|e| e.operation == Operation::Put && e.value == *name)
        .map(|e| e.revision))
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

fn op_timeout(ttl: Duration) -> Duration {
    (ttl / 3).min(MAX_OP_TIMEOUT)
}

fn retry_delay(ttl: Duration) -> Duration {
    (ttl / 10).clamp(MIN_RETRY, MAX_RETRY)
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

    #[test]
    fn timings_scale_with_the_ttl_within_bounds() {
        assert_eq!(op_timeout(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(op_timeout(Duration::from_secs(60)), MAX_OP_TIMEOUT);
        assert_eq!(retry_delay(Duration::from_millis(100)), MIN_RETRY);
        assert_eq!(retry_delay(Duration::from_secs(60)), MAX_RETRY);
    }
}
