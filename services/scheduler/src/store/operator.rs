//! What the store keeps about operators rather than agents: the `Idempotency-Key`s of
//! `POST /v1/tasks` and the append-only audit log (the `scheduler_idempotency*` and
//! `scheduler_audit` tables).
//!
//! An idempotency key is remembered per API key name (two callers cannot collide) with the
//! canonical form of the request that used it and the task it created. The lookup, the task
//! and the remembered key are one write transaction, and redb runs one writer at a time, so
//! two concurrent requests with one key create one task. Keys older than the retention are
//! treated as unknown and pruned, a bounded number per create, so no request pays for a
//! backlog.
//!
//! The audit log is keyed by a sequence number that only grows; this module has no code
//! that removes or rewrites an entry. A change and its entry can share one transaction
//! ([`Store::audited`]), so the log never misses a change that committed.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{
    Store, StoreError, TargetState, TaskId, TaskSpec, UserId, begin_durable_write, cancel_in,
    create_task_in, decode, encode, validate_spec,
};

/// Idempotency keys: (API key name, idempotency key) -> `IdempotencyRecord`.
const IDEMPOTENCY: TableDefinition<'_, (&str, &str), &[u8]> =
    TableDefinition::new("scheduler_idempotency");
/// The same keys in creation order, for pruning: (created ms, API key name, key).
const IDEMPOTENCY_ORDER: TableDefinition<'_, (u64, &str, &str), ()> =
    TableDefinition::new("scheduler_idempotency_order");
/// The audit log: sequence number (from 1) -> `AuditRow`.
const AUDIT: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("scheduler_audit");

/// Longest `Idempotency-Key` accepted (Stripe's limit).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// Most audit entries one read returns.
pub const MAX_AUDIT_LIST: usize = 1000;
/// Expired idempotency keys removed per create: pruning never makes one request slow.
const PRUNE_PER_CREATE: usize = 64;

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(IDEMPOTENCY_ORDER)?;
    txn.open_table(AUDIT)?;
    Ok(())
}

/// A request's claim on an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// The API key's name: keys are per caller.
    pub actor: String,
    /// The `Idempotency-Key` header.
    pub key: String,
    /// The request in a canonical form: a reuse must present the same.
    pub fingerprint: String,
    /// Keys remembered from before this time (ms) have expired and count as unknown.
    pub not_before_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct IdempotencyRecord {
    fingerprint: String,
    task_id: TaskId,
    created_at_ms: u64,
}

/// What [`Store::create_task_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new task.
    New(TaskId),
    /// The idempotency key was known with the same request: the task it created then.
    Replayed(TaskId),
}

impl Created {
    /// The task id either way.
    pub fn task_id(self) -> TaskId {
        match self {
            Created::New(id) | Created::Replayed(id) => id,
        }
    }
}

/// An audit entry before it has a sequence number and a time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    /// Who: the API key's name.
    pub actor: String,
    /// What, as `noun.verb` (`task.create`, `task.cancel`, `agent.revoke`).
    pub action: String,
    /// On what, as `kind/id` (`task/42`, `agent/edge-1`).
    pub target: String,
    /// Anything else worth keeping (JSON).
    pub detail: serde_json::Value,
    /// The request's trace id, when it has one.
    pub trace_id: Option<String>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Position in the log, from 1, strictly increasing.
    pub seq: u64,
    /// When it was recorded, ms since the epoch.
    pub at_ms: u64,
    /// Who: the API key's name.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Details.
    pub detail: serde_json::Value,
    /// The request's trace id.
    pub trace_id: Option<String>,
}

/// The stored form; the detail as JSON text so any JSON survives MessagePack unchanged.
#[derive(Debug, Serialize, Deserialize)]
struct AuditRow {
    at_ms: u64,
    actor: String,
    action: String,
    target: String,
    detail: String,
    trace_id: Option<String>,
}

impl Store {
    /// [`Store::create_task`] with an optional idempotency key and its audit entry, in one
    /// transaction. With a `claim` whose key is remembered (and not expired): the same
    /// fingerprint gives [`Created::Replayed`] with the first task and changes nothing; a
    /// different one fails with [`StoreError::IdempotencyConflict`]. Otherwise the task is
    /// created, the key remembered and `audit(task id)` appended to the log.
    pub fn create_task_once(
        &self,
        spec: &TaskSpec,
        created_at_ms: u64,
        claim: Option<&IdempotencyClaim>,
        audit: impl FnOnce(TaskId) -> NewAuditEntry,
    ) -> Result<(Created, Option<AuditEntry>), StoreError> {
        validate_spec(spec)?;
        let txn = begin_durable_write(&self.db)?;
        let mut expired_at = None;
        if let Some(claim) = claim {
            let known = {
                let table = txn.open_table(IDEMPOTENCY)?;
                match table.get((claim.actor.as_str(), claim.key.as_str()))? {
                    Some(v) => Some(decode::<IdempotencyRecord>(v.value(), "idempotency key")?),
                    None => None,
                }
            };
            if let Some(rec) = known {
                if rec.created_at_ms >= claim.not_before_ms {
                    txn.abort()?;
                    return if rec.fingerprint == claim.fingerprint {
                        Ok((Created::Replayed(rec.task_id), None))
                    } else {
                        Err(StoreError::IdempotencyConflict {
                            key: claim.key.clone(),
                            task_id: rec.task_id,
                        })
                    };
                }
                expired_at = Some(rec.created_at_ms);
            }
        }
        let id = create_task_in(&txn, spec, created_at_ms)?;
        if let Some(claim) = claim {
            prune_in(&txn, claim.not_before_ms, PRUNE_PER_CREATE)?;
            let mut order = txn.open_table(IDEMPOTENCY_ORDER)?;
            if let Some(old) = expired_at {
                order.remove((old, claim.actor.as_str(), claim.key.as_str()))?;
            }
            order.insert(
                (created_at_ms, claim.actor.as_str(), claim.key.as_str()),
                (),
            )?;
            let record = IdempotencyRecord {
                fingerprint: claim.fingerprint.clone(),
                task_id: id,
                created_at_ms,
            };
            txn.open_table(IDEMPOTENCY)?.insert(
                (claim.actor.as_str(), claim.key.as_str()),
                encode(&record, "idempotency key")?.as_slice(),
            )?;
        }
        let entry = append_in(&txn, created_at_ms, audit(id))?;
        txn.commit()?;
        Ok((Created::New(id), Some(entry)))
    }

    /// Forgets every idempotency key remembered before `not_before_ms`; returns how many.
    pub fn prune_idempotency(&self, not_before_ms: u64) -> Result<usize, StoreError> {
        self.write(|txn| prune_in(txn, not_before_ms, usize::MAX))
    }

    /// How many idempotency keys are remembered.
    pub fn idempotency_keys(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata as _;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(IDEMPOTENCY)?.len()?)
    }

    /// Runs `change` and appends the entry `entry` makes of its outcome to the audit log, in
    /// one durable transaction: either both are stored or neither. For handlers whose change
    /// is a `*_in(txn, ...)` function of this module's parent.
    pub(crate) fn audited<T>(
        &self,
        at_ms: u64,
        change: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
        entry: impl FnOnce(&T) -> NewAuditEntry,
    ) -> Result<(T, AuditEntry), StoreError> {
        self.write(|txn| {
            let out = change(txn)?;
            let recorded = append_in(txn, at_ms, entry(&out))?;
            Ok((out, recorded))
        })
    }

    /// [`Store::cancel`] and its audit entry in one transaction.
    pub fn cancel_audited(
        &self,
        task_id: TaskId,
        at_ms: u64,
        entry: impl FnOnce(&[(UserId, TargetState)]) -> NewAuditEntry,
    ) -> Result<(Vec<(UserId, TargetState)>, AuditEntry), StoreError> {
        self.audited(
            at_ms,
            |txn| cancel_in(txn, task_id, at_ms),
            |cancelled| entry(cancelled),
        )
    }

    /// Appends one entry to the audit log on its own (when the change it records was stored
    /// elsewhere); returns it with its sequence number.
    pub fn append_audit(&self, at_ms: u64, entry: NewAuditEntry) -> Result<AuditEntry, StoreError> {
        self.write(|txn| append_in(txn, at_ms, entry))
    }

    /// Up to `limit` (at most [`MAX_AUDIT_LIST`]) audit entries after sequence number
    /// `after`, oldest first: page with the last `seq` seen.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut out = Vec::new();
        for item in table.range(first..)?.take(limit.min(MAX_AUDIT_LIST)) {
            let (k, v) = item?;
            out.push(entry_of(k.value(), decode(v.value(), "audit entry")?));
        }
        Ok(out)
    }
}

fn entry_of(seq: u64, row: AuditRow) -> AuditEntry {
    AuditEntry {
        seq,
        at_ms: row.at_ms,
        actor: row.actor,
        action: row.action,
        target: row.target,
        detail: serde_json::from_str(&row.detail).unwrap_or(serde_json::Value::String(row.detail)),
        trace_id: row.trace_id,
    }
}

/// The only writer of the audit table: inserts at the next sequence number.
pub(super) fn append_in(
    txn: &WriteTransaction,
    at_ms: u64,
    entry: NewAuditEntry,
) -> Result<AuditEntry, StoreError> {
    let mut table = txn.open_table(AUDIT)?;
    let last = table.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    let seq = last
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("audit sequence exhausted".to_owned()))?;
    let row = AuditRow {
        at_ms,
        actor: entry.actor,
        action: entry.action,
        target: entry.target,
        detail: entry.detail.to_string(),
        trace_id: entry.trace_id,
    };
    table.insert(seq, encode(&row, "audit entry")?.as_slice())?;
    Ok(entry_of(seq, row))
}

/// Removes up to `max` idempotency keys remembered before `not_before_ms`, oldest first.
fn prune_in(txn: &WriteTransaction, not_before_ms: u64, max: usize) -> Result<usize, StoreError> {
    let mut order = txn.open_table(IDEMPOTENCY_ORDER)?;
    let mut keys = txn.open_table(IDEMPOTENCY)?;
    let old: Vec<(u64, String, String)> = order
        .range(..(not_before_ms, "", ""))?
        .take(max)
        .map(|item| {
            item.map(|(k, _)| {
                let (at, actor, key) = k.value();
                (at, actor.to_owned(), key.to_owned())
            })
        })
        .collect::<Result<_, _>>()?;
    for (at, actor, key) in &old {
        order.remove((*at, actor.as_str(), key.as_str()))?;
        // Only if the record is still the one this index entry was made for.
        let stale = match keys.get((actor.as_str(), key.as_str()))? {
            Some(v) => {
                decode::<IdempotencyRecord>(v.value(), "idempotency key")?.created_at_ms == *at
            }
            None => false,
        };
        if stale {
            keys.remove((actor.as_str(), key.as_str()))?;
        }
    }
    Ok(old.len())
}
