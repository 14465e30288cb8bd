//! Delivery receipts per push id, shared by every replica through a JetStream KV bucket
//! (`p.<push id>`, kept for an hour): how many sockets were targeted when the push was
//! published, how many gateways reported handing it over, how many clients acked it.
//!
//! Acks arrive in bursts (a broadcast to 10,000 users is acked 10,000 times within a
//! second), all for one key. Each replica therefore counts them in memory and folds the
//! sums into the bucket every [`FLUSH_EVERY`] with compare-and-set, so the bucket sees one
//! update per push per replica per period instead of one per ack, and replicas that
//! flush at the same time still all count (a lost race retries with fresh counts). Reads
//! add the replica's own unflushed counts; other replicas' are at most one period behind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use messages::payload;
use serde::{Deserialize, Serialize};

/// Counts for one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Receipt {
    /// Sockets the push was aimed at (from the presence view at publish time).
    pub targeted: u64,
    /// Sockets gateways reported handing the push to.
    pub delivered: u64,
    /// Clients that acknowledged it.
    pub acked: u64,
    /// Unix ms the push was published.
    pub created_ms: u64,
}

/// Why a receipt operation failed.
#[derive(Debug, thiserror::Error)]
#[error("receipt store: {0}")]
pub struct ReceiptError(String);

/// How often counted acks and deliveries are folded into the bucket.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Counts not yet in the bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Delta {
    delivered: u64,
    acked: u64,
}

/// Handle to the receipts bucket.
#[derive(Debug)]
pub struct Receipts {
    kv: kv::Store,
    pending: Mutex<HashMap<u64, Delta>>,
}

fn key(id: u64) -> String {
    format!("p.{id}")
}

impl Receipts {
    /// Opens or creates the bucket.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, ReceiptError> {
        let config = kv::Config {
            bucket: bucket.to_owned(),
            history: 1,
            max_age: std::time::Duration::from_secs(3600),
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let kv = match js.create_key_value(config).await {
            Ok(kv) => kv,
            Err(_) => js
                .get_key_value(bucket)
                .await
                .map_err(|e| ReceiptError(e.to_string()))?,
        };
        Ok(Receipts {
            kv,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Starts tracking a push.
    pub async fn create(
        &self,
        id: u64,
        targeted: u64,
        created_ms: u64,
    ) -> Result<(), ReceiptError> {
        let receipt = Receipt {
            targeted,
            created_ms,
            ..Receipt::default()
        };
        let bytes = payload::to_bus(&receipt).map_err(|e| ReceiptError(e.to_string()))?;
        self.kv
            .put(key(id), Bytes::from(bytes))
            .await
            .map_err(|e| ReceiptError(e.to_string()))?;
        Ok(())
    }

    /// The counts for a push, if it is tracked, including this replica's unflushed ones.
    pub async fn get(&self, id: u64) -> Result<Option<Receipt>, ReceiptError> {
        let Some(bytes) = self
            .kv
            .get(key(id))
            .await
            .map_err(|e| ReceiptError(e.to_string()))?
        else {
            return Ok(None);
        };
        let mut receipt: Receipt =
            payload::from_bus(&bytes).map_err(|e| ReceiptError(e.to_string()))?;
        if let Some(d) = self.lock().get(&id) {
            receipt.delivered += d.delivered;
            receipt.acked += d.acked;
        }
        Ok(Some(receipt))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Delta>> {
        // A panic while holding this lock cannot leave the map inconsistent (plain adds).
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts deliveries and acks for a push; they reach the bucket with the next
    /// [`Receipts::flush`]. Untracked pushes (no receipt asked) are dropped then.
    pub fn add(&self, id: u64, delivered: u64, acked: u64) {
        let mut pending = self.lock();
        let d = pending.entry(id).or_default();
        d.delivered += delivered;
        d.acked += acked;
    }

    /// Folds every pending count into the bucket; returns how many pushes were updated.
    /// Counts that could not be written (the bucket unreachable, a push contended beyond
    /// the retries) stay pending for the next flush; the first error is returned.
    pub async fn flush(&self) -> Result<usize, ReceiptError> {
        let batch: Vec<(u64, Delta)> = self.lock().drain().collect();
        let mut updated = 0;
        let mut first_error = None;
        for (id, delta) in batch {
            match self.apply(id, delta).await {
                Ok(true) => updated += 1,
                Ok(false) => {}
                Err(e) => {
                    self.add(id, delta.delivered, delta.acked);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(updated),
        }
    }

    /// Adds to a tracked push's counters in the bucket; `false` for an untracked push.
    async fn apply(&self, id: u64, delta: Delta) -> Result<bool, ReceiptError> {
        let Delta { delivered, acked } = delta;
        for _ in 0..16 {
            let Some(entry) = self
                .kv
                .entry(key(id))
                .await
                .map_err(|e| ReceiptError(e.to_string()))?
            else {
                return Ok(false);
            };
            if entry.operation != kv::Operation::Put {
                return Ok(false);
            }
            let mut receipt: Receipt =
                payload::from_bus(&entry.value).map_err(|e| ReceiptError(e.to_string()))?;
            receipt.delivered += delivered;
            receipt.acked += acked;
            let bytes = payload::to_bus(&receipt).map_err(|e| ReceiptError(e.to_string()))?;
            match self
                .kv
                .update(key(id), Bytes::from(bytes), entry.revision)
                .await
            {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(ReceiptError(e.to_string())),
            }
        }
        Err(ReceiptError(format!("receipt {id} kept changing; gave up")))
    }
}
