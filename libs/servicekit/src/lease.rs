//! The one KV lease mechanism: a key in a JetStream key-value bucket whose `max_age` is the
//! lease TTL, owned by whoever wrote it last with a compare on its revision. The gateway's
//! worker-id leases and the scheduler's leader lease are both this, with their own policy
//! on top (which key, what to do while it is held by someone else, what losing it means).
//!
//! This module owns opening the bucket ([`Bucket::open`], including the TTL actually in
//! force), taking a key ([`Bucket::create`], [`Bucket::reclaim`]), keeping it
//! ([`Lease::hold`]) and deleting it ([`Lease::release`]).
//!
//! Exclusivity rests on the server: a key is only created when it has no live value, and
//! every later write compares on the revision our last write produced, so a refresh can
//! never overwrite a lease someone else took after ours expired. [`Lease::hold`] declares
//! the lease lost one TTL after the *sending* of the last refresh that succeeded; the
//! server cannot expire that refresh earlier, so the old holder gives up no later than
//! anyone else can take over (as long as the server's clock does not jump forward).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::context::{CreateKeyValueError, CreateKeyValueErrorKind};
use async_nats::jetstream::kv::{
    self, CreateError, CreateErrorKind, EntryError, Operation, StatusError, UpdateError,
    UpdateErrorKind,
};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

/// Upper bound on one request, so a hung request cannot outlive the lease it extends.
pub const MAX_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest pause between retries.
pub const MIN_RETRY: Duration = Duration::from_millis(50);
/// Longest pause between refresh retries.
pub const MAX_RETRY: Duration = Duration::from_secs(1);

/// How the bucket is created when it does not exist yet.
#[derive(Debug, Clone)]
pub struct BucketConfig {
    /// Bucket name.
    pub bucket: String,
    /// The bucket's description, for operators listing buckets.
    pub description: String,
    /// Lease TTL: the bucket's `max_age`.
    pub ttl: Duration,
    /// Stream replicas (1 for a single server, 3 for a cluster that should survive the
    /// loss of a node).
    pub replicas: usize,
}

/// Why a lease could not be taken, refreshed or released.
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
    #[error("reading lease bucket {bucket} settings: {source}")]
    Status {
        /// Bucket name.
        bucket: String,
        /// The underlying error.
        #[source]
        source: StatusError,
    },
    /// Reading a lease key failed.
    #[error("reading {key}: {source}")]
    Read {
        /// The lease key.
        key: String,
        /// The underlying error.
        #[source]
        source: EntryError,
    },
    /// A compare-and-set write (reclaim, refresh or delete) failed for a reason other
    /// than a revision mismatch.
    #[error("writing {key}: {source}")]
    Write {
        /// The lease key.
        key: String,
        /// The underlying error.
        #[source]
        source: UpdateError,
    },
    /// Creating a lease failed for a reason other than the key being held.
    #[error("creating {key}: {source}")]
    Create {
        /// The lease key.
        key: String,
        /// The underlying error.
        #[source]
        source: CreateError,
    },
}

impl LeaseError {
    /// Whether trying again may help: everything but a bucket name or setting the server
    /// will never accept.
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Bucket { source, .. } => !matches!(
                source.kind(),
                CreateKeyValueErrorKind::InvalidStoreName | CreateKeyValueErrorKind::TooLongHistory
            ),
            _ => true,
        }
    }
}

/// An open lease bucket and the TTL in force in it.
#[derive(Debug, Clone)]
pub struct Bucket {
    name: String,
    /// The shorter of the configured TTL and the bucket's `max_age`: the bucket may have
    /// been created by an instance configured differently, and its `max_age` is what
    /// actually expires a lease.
    ttl: Duration,
    /// Shared with the leases taken from it; the handle carries the whole stream info
    /// (over a kilobyte), so it is not copied per lease.
    kv: Arc<kv::Store>,
}

impl Bucket {
    /// Creates the bucket, or opens it if it exists (possibly with other settings, which
    /// the TTL in force accounts for).
    pub async fn open(js: &Context, cfg: &BucketConfig) -> Result<Bucket, LeaseError> {
        let config = kv::Config {
            bucket: cfg.bucket.clone(),
            description: cfg.description.clone(),
            history: 1,
            max_age: cfg.ttl,
            num_replicas: cfg.replicas.max(1),
            ..Default::default()
        };
        let kv = match js.create_key_value(config).await {
            Ok(kv) => kv,
            Err(err) if err.kind() == CreateKeyValueErrorKind::BucketCreate => {
                match js.get_key_value(cfg.bucket.as_str()).await {
                    Ok(kv) => kv,
                    Err(get_err) => {
                        // The create error says more (no JetStream, no resources, ...).
                        debug!(%get_err, "Opening the existing lease bucket failed too.");
                        return Err(LeaseError::Bucket {
                            bucket: cfg.bucket.clone(),
                            source: err,
                        });
                    }
                }
            }
            Err(source) => {
                return Err(LeaseError::Bucket {
                    bucket: cfg.bucket.clone(),
                    source,
                });
            }
        };
        let ttl = effective_ttl(&kv, cfg).await?;
        Ok(Bucket {
            name: cfg.bucket.clone(),
            ttl,
            kv: Arc::new(kv),
        })
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TTL in force for leases in this bucket.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The underlying store, for policies that look at more than one key (listing).
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    /// Takes `key` for `holder` if it has no live value: `None` if someone holds it.
    pub async fn create(&self, key: &str, holder: &Bytes) -> Result<Option<Lease>, LeaseError> {
        let sent_at = Instant::now();
        match self.kv.create(key, holder.clone()).await {
            Ok(revision) => Ok(Some(self.lease(key, holder, revision, sent_at))),
            Err(err) if err.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(source) => Err(LeaseError::Create {
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// Takes `key` back for `holder` if it is still at `revision` (a lease of ours a
    /// previous run left behind): `None` if it was written since.
    pub async fn reclaim(
        &self,
        key: &str,
        holder: &Bytes,
        revision: u64,
    ) -> Result<Option<Lease>, LeaseError> {
        let sent_at = Instant::now();
        match self.kv.update(key, holder.clone(), revision).await {
            Ok(revision) => Ok(Some(self.lease(key, holder, revision, sent_at))),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(source) => Err(LeaseError::Write {
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// The live value of `key` and its revision; `None` if it is absent, deleted or
    /// expired.
    pub async fn live(&self, key: &str) -> Result<Option<(Bytes, u64)>, LeaseError> {
        live(&self.kv, key).await
    }

    fn lease(&self, key: &str, holder: &Bytes, revision: u64, sent_at: Instant) -> Lease {
        Lease {
            key: key.to_owned(),
            holder: holder.clone(),
            revision,
            ttl: self.ttl,
            sent_at,
            kv: Arc::clone(&self.kv),
        }
    }
}

async fn effective_ttl(kv: &kv::Store, cfg: &BucketConfig) -> Result<Duration, LeaseError> {
    let status = kv.status().await.map_err(|source| LeaseError::Status {
        bucket: cfg.bucket.clone(),
        source,
    })?;
    let max_age = status.info.config.max_age;
    let (bucket, ttl) = (&cfg.bucket, cfg.ttl);
    if max_age.is_zero() {
        warn!(%bucket, "Lease bucket has no max_age; abandoned leases never expire.");
        return Ok(ttl);
    }
    if max_age != ttl {
        warn!(%bucket, ?max_age, ?ttl, "Lease bucket max_age is not the ttl; using the shorter.");
    }
    Ok(max_age.min(ttl))
}

async fn live(kv: &kv::Store, key: &str) -> Result<Option<(Bytes, u64)>, LeaseError> {
    let entry = kv.entry(key).await.map_err(|source| LeaseError::Read {
        key: key.to_owned(),
        source,
    })?;
    Ok(entry
        .filter(|e| e.operation == Operation::Put)
        .map(|e| (e.value, e.revision)))
}

/// How [`Lease::hold`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Someone else owns the key, or no refresh succeeded within the TTL.
    Lost,
    /// A stop was requested: the caller should [`Lease::release`] the lease.
    StopRequested,
    /// The stop sender was dropped: the owner is gone, so the lease is abandoned to
    /// expire rather than deleted behind its back.
    Abandoned,
}

/// A held key: the revision our last write gave it, and when that write was sent.
#[derive(Debug)]
pub struct Lease {
    key: String,
    holder: Bytes,
    revision: u64,
    ttl: Duration,
    /// The server cannot expire the write that produced `revision` before `sent_at + ttl`.
    sent_at: Instant,
    kv: Arc<kv::Store>,
}

impl Lease {
    /// The key held.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key's revision after our last write.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The TTL in force.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Refreshes the lease every TTL/3 until it is lost or `stop` fires (or closes).
    /// Failed refreshes are retried every TTL/10 (clamped to [`MIN_RETRY`],
    /// [`MAX_RETRY`]) until the TTL since the last good one has passed.
    pub async fn hold(&mut self, stop: &mut oneshot::Receiver<()>) -> Held {
        let period = self.ttl / 3;
        let retry = retry_delay(self.ttl);
        let mut next = self.sent_at + period;
        loop {
            let deadline = self.sent_at + self.ttl;
            tokio::select! {
                stopped = &mut *stop => {
                    return if stopped.is_ok() { Held::StopRequested } else { Held::Abandoned };
                }
                () = sleep_until(next.min(deadline)) => {}
            }
            let key = self.key.as_str();
            let now = Instant::now();
            if now >= deadline {
                warn!(key, ttl = ?self.ttl, "No refresh succeeded within the ttl; lease lost.");
                return Held::Lost;
            }
            let limit = op_timeout(self.ttl).min(deadline.saturating_duration_since(now));
            match timeout(limit, self.refresh()).await {
                Ok(Ok(Some((revision, sent_at)))) => {
                    self.revision = revision;
                    self.sent_at = sent_at;
                    next = sent_at + period;
                }
                Ok(Ok(None)) => {
                    warn!(key = self.key.as_str(), "Lease taken over by someone else.");
                    return Held::Lost;
                }
                Ok(Err(err)) => {
                    warn!(key, %err, "Lease refresh failed; retrying.");
                    next = Instant::now() + retry;
                }
                Err(_) => {
                    warn!(key, ?limit, "Lease refresh timed out; retrying.");
                    next = Instant::now() + retry;
                }
            }
        }
    }

    /// One compare-and-set refresh: `Some((revision, sent_at))` while we hold the key,
    /// `None` once someone else does.
    async fn refresh(&self) -> Result<Option<(u64, Instant)>, LeaseError> {
        let sent_at = Instant::now();
        match self
            .kv
            .update(&self.key, self.holder.clone(), self.revision)
            .await
        {
            Ok(revision) => return Ok(Some((revision, sent_at))),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(source) => return Err(self.write_error(source)),
        }
        // A refresh that timed out on our side may have landed after all, leaving our
        // value under a revision we never saw; anything else means the lease is gone.
        let Some(current) = self.revision_if_ours().await? else {
            return Ok(None);
        };
        let sent_at = Instant::now();
        match self
            .kv
            .update(&self.key, self.holder.clone(), current)
            .await
        {
            Ok(revision) => {
                debug!(
                    key = self.key.as_str(),
                    "Lease refreshed at a revision we had missed."
                );
                Ok(Some((revision, sent_at)))
            }
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(source) => Err(self.write_error(source)),
        }
    }

    /// Deletes the key if it still holds our lease, so the next holder can take it at
    /// once. Bounded by the request timeout; a failure only delays the next holder by the
    /// rest of the TTL, so it is logged, not returned.
    pub async fn release(&self) {
        let key = self.key.as_str();
        match timeout(op_timeout(self.ttl), self.delete_if_ours()).await {
            Ok(Ok(true)) => info!(key, "Released the lease."),
            Ok(Ok(false)) => debug!(key, "The lease was no longer ours to release."),
            Ok(Err(err)) => warn!(key, %err, "Releasing the lease failed; it expires on its own."),
            Err(_) => warn!(key, "Releasing the lease timed out; it expires on its own."),
        }
    }

    async fn delete_if_ours(&self) -> Result<bool, LeaseError> {
        match self
            .kv
            .delete_expect_revision(&self.key, Some(self.revision))
            .await
        {
            Ok(()) => return Ok(true),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => {}
            Err(source) => return Err(self.write_error(source)),
        }
        // As in `refresh`: a timed-out refresh may have moved the revision on.
        let Some(current) = self.revision_if_ours().await? else {
            return Ok(false);
        };
        match self
            .kv
            .delete_expect_revision(&self.key, Some(current))
            .await
        {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(source) => Err(self.write_error(source)),
        }
    }

    async fn revision_if_ours(&self) -> Result<Option<u64>, LeaseError> {
        Ok(live(&self.kv, &self.key)
            .await?
            .filter(|(value, _)| *value == self.holder)
            .map(|(_, revision)| revision))
    }

    fn write_error(&self, source: UpdateError) -> LeaseError {
        LeaseError::Write {
            key: self.key.clone(),
            source,
        }
    }
}

/// Bound on one lease request: within a refresh period, and never over [`MAX_OP_TIMEOUT`].
pub fn op_timeout(ttl: Duration) -> Duration {
    (ttl / 3).min(MAX_OP_TIMEOUT)
}

/// Pause before retrying a failed refresh: TTL/10 within [`MIN_RETRY`], [`MAX_RETRY`].
pub fn retry_delay(ttl: Duration) -> Duration {
    (ttl / 10).clamp(MIN_RETRY, MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_scale_with_the_ttl_within_bounds() {
        assert_eq!(op_timeout(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(op_timeout(Duration::from_secs(60)), MAX_OP_TIMEOUT);
        assert_eq!(retry_delay(Duration::from_millis(100)), MIN_RETRY);
        assert_eq!(retry_delay(Duration::from_secs(60)), MAX_RETRY);
    }
}
