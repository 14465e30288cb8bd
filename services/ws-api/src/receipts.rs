//! Delivery receipts per push id, shared by every replica through a JetStream KV bucket
//! (`p.<push id>`, kept for an hour): how many sockets were targeted when the push was
//! published, how many gateways reported handing it over, how many clients acked it.
//! Counters are updated with compare-and-set so events handled by different replicas at
//! the same time all count.

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

/// Handle to the receipts bucket.
#[derive(Debug)]
pub struct Receipts {
    kv: kv::Store,
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
        Ok(Receipts { kv })
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

    /// The counts for a push, if it is tracked.
    pub async fn get(&self, id: u64) -> Result<Option<Receipt>, ReceiptError> {
        let Some(bytes) = self
            .kv
            .get(key(id))
            .await
            .map_err(|e| ReceiptError(e.to_string()))?
        else {
            return Ok(None);
        };
        payload::from_bus(&bytes)
            .map(Some)
            .map_err(|e| ReceiptError(e.to_string()))
    }

    /// Adds to a tracked push's counters; untracked pushes (no receipt asked) are ignored.
    pub async fn add(&self, id: u64, delivered: u64, acked: u64) -> Result<(), ReceiptError> {
        for _ in 0..16 {
            let Some(entry) = self
                .kv
                .entry(key(id))
                .await
                .map_err(|e| ReceiptError(e.to_string()))?
            else {
                return Ok(());
            };
            if entry.operation != kv::Operation::Put {
                return Ok(());
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
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(ReceiptError(e.to_string())),
            }
        }
        Err(ReceiptError(format!("receipt {id} kept changing; gave up")))
    }
}
