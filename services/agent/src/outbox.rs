//! The agent's durable outbox: every report and result the agent produces is written here
//! before it is sent, and removed only when the scheduler acknowledges it.
//!
//! This module owns the on-disk queue (a redb file), its sequence numbers and the stable
//! message ids the scheduler uses to ingest idempotently. It does not send anything: the
//! connection loop reads [`Outbox::pending`], sends, and calls [`Outbox::ack`] when the
//! scheduler's acknowledgement arrives. After a disconnect or a restart the loop simply
//! sends `pending` again, so delivery is at-least-once and the message id turns it into
//! exactly-once ingestion on the scheduler side.
//!
//! # Durability
//! [`Outbox::append`] returns only after a redb write transaction with
//! [`redb::Durability::Immediate`] has committed, which redb defines as "persistent as soon
//! as `commit` returns" (the commit fsyncs). A `kill -9` (or a power cut, within what the
//! disk's fsync promises) after `append` returned cannot lose the entry; a kill during
//! `append` either keeps the whole entry or none of it, because the entry and the sequence
//! counter are written in the same transaction.
//!
//! All calls block on disk I/O (an fsync per write); async callers should run them on a
//! blocking thread (`tokio::task::spawn_blocking`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use servicekit::durable::{self, DbError};

/// Entries: sequence -> (appended at, unix ms; kind; payload).
const ENTRIES: TableDefinition<'_, u64, (u64, &str, &[u8])> =
    TableDefinition::new("outbox_entries");

/// Small bookkeeping values. `u128` so the instance id fits; the others are widened `u64`s.
const META: TableDefinition<'_, &str, u128> = TableDefinition::new("outbox_meta");
/// Ids of signed commands acted on: command id -> its expiry (unix ms). An id is kept until
/// its command could no longer verify anyway, so a replay is refused across restarts.
const SEEN_COMMANDS: TableDefinition<'_, &str, u64> = TableDefinition::new("seen_commands");

/// The random id of this outbox file, written once on first open.
const META_INSTANCE_ID: &str = "instance_id";
/// The sequence number the next append will use. Persisted (rather than derived from the
/// last entry) so sequences keep increasing after every entry has been acknowledged.
const META_NEXT_SEQ: &str = "next_seq";
/// On-disk layout version of this module's tables.
const META_FORMAT: &str = "format";
const FORMAT_VERSION: u128 = 1;

/// redb's page cache is 1 GiB by default; an edge daemon's outbox is small and the machine
/// is someone else's, so keep the cache modest.
const CACHE_BYTES: usize = 16 * 1024 * 1024;
/// How often remembered command ids are pruned, ms of the caller's clock. The prune scans
/// the whole table; on every command it cost a scan of every id still valid (600 s of
/// commands by default) per command.
const PRUNE_EVERY_MS: u64 = 60_000;

/// Why an outbox operation failed.
///
/// After a failed commit ([`DbError::Commit`]) redb refuses further write transactions on
/// the open database (the commit may or may not have become durable); drop the [`Outbox`]
/// and open it again, which repairs the file.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Opening, reading or writing the redb file failed.
    #[error("outbox: {0}")]
    Db(#[from] DbError),
    /// The file holds values this code did not write.
    #[error("outbox: corrupt or foreign file: {0}")]
    Corrupt(String),
    /// 2^64 - 1 entries have been appended to this file.
    #[error("outbox: sequence numbers exhausted")]
    SequenceExhausted,
}

servicekit::redb_errors!(OutboxError);

/// The stable id of one outbox entry: the outbox file's random instance id plus the entry's
/// sequence number. A replayed entry carries the same id, so the scheduler can ingest by id
/// and count a result once however often it arrives. The instance id makes ids from a
/// recreated outbox file (whose sequences start again at 1) distinct from the old file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The outbox file's random instance id.
    pub instance: u128,
    /// The entry's sequence number in that file.
    pub seq: u64,
}

impl fmt::Display for MessageId {
    /// `<32 lowercase hex digits>-<decimal seq>`: only bytes that are valid in a NATS subject
    /// token and in a header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}-{}", self.instance, self.seq)
    }
}

impl MessageId {
    /// Parses the [`fmt::Display`] form (`<hex instance>-<decimal seq>`); `None` for
    /// anything else, because acks name ids the scheduler echoes back and a garbled one must
    /// simply match nothing.
    pub fn parse(s: &str) -> Option<MessageId> {
        let (instance, seq) = s.rsplit_once('-')?;
        if instance.is_empty() || instance.len() > 32 {
            return None;
        }
        Some(MessageId {
            instance: u128::from_str_radix(instance, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// One pending outbox entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number: strictly increasing in append order, never reused in this file.
    pub seq: u64,
    /// What the payload is (for example `report` or `result`); the outbox does not interpret it.
    pub kind: String,
    /// The bytes to send.
    pub payload: Vec<u8>,
    /// Wall-clock time of the append, unix milliseconds (0 if the clock is before 1970).
    pub appended_at_ms: u64,
    /// The stable message id; the same on every replay.
    pub id: MessageId,
}

/// A durable, ordered queue of unacknowledged messages in one redb file.
///
/// Cheap to share by reference across threads: redb serialises write transactions and
/// readers see committed snapshots.
#[derive(Debug)]
pub struct Outbox {
    db: Database,
    instance: u128,
    path: PathBuf,
    /// The caller's clock value from which the next prune of remembered commands is due.
    next_prune_ms: AtomicU64,
}

impl Outbox {
    /// Opens the outbox at `path`, creating the file (and its directory) on first use.
    ///
    /// On first open a random instance id is generated and committed; later opens read it
    /// back, so message ids stay stable across restarts. After a crash redb repairs the file
    /// here (for a small outbox this is quick).
    pub fn open(path: impl AsRef<Path>) -> Result<Outbox, OutboxError> {
        let path = path.as_ref().to_path_buf();
        let db = durable::open(&path, CACHE_BYTES)?;

        // Create the tables and the bookkeeping values in one transaction, so a crash during
        // first open leaves either a complete, initialised file or an empty one.
        let txn = begin_durable_write(&db)?;
        let instance = {
            let mut meta = txn.open_table(META)?;
            let format = meta.get(META_FORMAT)?.map(|v| v.value());
            match format {
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(other) => {
                    return Err(OutboxError::Corrupt(format!(
                        "format version {other}, this agent understands {FORMAT_VERSION}"
                    )));
                }
            }
            if meta.get(META_NEXT_SEQ)?.is_none() {
                // Sequences start at 1 so that 0 never names an entry.
                meta.insert(META_NEXT_SEQ, 1u128)?;
            }
            let existing = meta.get(META_INSTANCE_ID)?.map(|v| v.value());
            match existing {
                Some(id) => id,
                None => {
                    // Zero is avoided only so an id is never mistaken for "unset".
                    let id = rand::random::<u128>().max(1);
                    meta.insert(META_INSTANCE_ID, id)?;
                    id
                }
            }
        };
        txn.open_table(ENTRIES)?;
        txn.commit()?;
        Ok(Outbox {
            db,
            instance,
            path,
            next_prune_ms: AtomicU64::new(0),
        })
    }

    /// The file this outbox lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This outbox file's random instance id (the first half of every [`MessageId`]).
    pub fn instance_id(&self) -> u128 {
        self.instance
    }

    /// The message id of the entry with sequence `seq` in this outbox.
    pub fn message_id(&self, seq: u64) -> MessageId {
        MessageId {
            instance: self.instance,
            seq,
        }
    }

    /// Appends an entry and returns its sequence number.
    ///
    /// When this returns `Ok` the entry has been committed with immediate durability: it
    /// survives a kill -9 of the process from then on.
    pub fn append(&self, kind: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        let appended_at_ms = servicekit::clock::now_ms();
        let txn = begin_durable_write(&self.db)?;
        let seq = {
            let mut meta = txn.open_table(META)?;
            let seq = read_next_seq(&meta)?;
            let next = seq.checked_add(1).ok_or(OutboxError::SequenceExhausted)?;
            let mut entries = txn.open_table(ENTRIES)?;
            entries.insert(seq, (appended_at_ms, kind, payload))?;
            // The counter moves in the same transaction as the entry: after a crash either
            // both are there or neither is, so a sequence is never issued twice.
            meta.insert(META_NEXT_SEQ, u128::from(next))?;
            seq
        };
        txn.commit()?;
        Ok(seq)
    }

    /// Appends an entry whose payload embeds its own message id, and returns its sequence.
    ///
    /// `build` receives the id the entry will have and returns the payload. The sequence is
    /// read and the entry written in one write transaction (redb serialises writers), so
    /// concurrent appends can never hand two payloads the same id. Results carry their
    /// `message_id` inside the msgpack body, which is why plain [`Outbox::append`] (where the
    /// id is known only afterwards) is not enough for them.
    pub fn append_with<E>(
        &self,
        kind: &str,
        build: impl FnOnce(MessageId) -> Result<Vec<u8>, E>,
    ) -> Result<u64, E>
    where
        E: From<OutboxError>,
    {
        let appended_at_ms = servicekit::clock::now_ms();
        let txn = begin_durable_write(&self.db)?;
        let seq = {
            let mut meta = txn.open_table(META).map_err(OutboxError::from)?;
            let seq = read_next_seq(&meta)?;
            let next = seq.checked_add(1).ok_or(OutboxError::SequenceExhausted)?;
            // On a build error the transaction is dropped uncommitted: nothing is written.
            let payload = build(self.message_id(seq))?;
            let mut entries = txn.open_table(ENTRIES).map_err(OutboxError::from)?;
            entries
                .insert(seq, (appended_at_ms, kind, payload.as_slice()))
                .map_err(OutboxError::from)?;
            meta.insert(META_NEXT_SEQ, u128::from(next))
                .map_err(OutboxError::from)?;
            seq
        };
        txn.commit().map_err(OutboxError::from)?;
        Ok(seq)
    }

    /// Up to `limit` pending (unacknowledged) entries, oldest first (ascending sequence).
    pub fn pending(&self, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let txn = self.db.begin_read()?;
        let entries = txn.open_table(ENTRIES)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in entries.iter()?.take(limit) {
            let (k, v) = item?;
            let seq = k.value();
            let (appended_at_ms, kind, payload) = v.value();
            out.push(Entry {
                seq,
                kind: kind.to_owned(),
                payload: payload.to_vec(),
                appended_at_ms,
                id: self.message_id(seq),
            });
        }
        Ok(out)
    }

    /// Removes the entry `seq` because the scheduler acknowledged it.
    ///
    /// Idempotent: returns `true` if the entry was pending and is now removed, `false` if it
    /// was not there (already acknowledged, or never appended). Acknowledgements can arrive
    /// twice after a replay, so `false` is not an error.
    pub fn ack(&self, seq: u64) -> Result<bool, OutboxError> {
        let txn = begin_durable_write(&self.db)?;
        let removed = {
            let mut entries = txn.open_table(ENTRIES)?;
            entries.remove(seq)?.is_some()
        };
        if removed {
            txn.commit()?;
        } else {
            // Nothing changed: skip the fsync a commit would cost.
            txn.abort()?;
        }
        Ok(removed)
    }

    /// Removes every pending entry with sequence `<= seq` (a cumulative acknowledgement) in
    /// one transaction and returns how many were removed.
    pub fn ack_up_to(&self, seq: u64) -> Result<u64, OutboxError> {
        let txn = begin_durable_write(&self.db)?;
        let mut removed = 0u64;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            // Only entries read from this iterator are removed, so it must be drained.
            for item in entries.extract_from_if(..=seq, |_, _| true)? {
                item?;
                removed += 1;
            }
        }
        if removed > 0 {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(removed)
    }

    /// Records that the signed command `id` (valid until `expires_ms`) is being acted on,
    /// durably, before the agent acts. Returns `false` if it was seen before: a replay.
    /// Ids whose command expired before `prune_before_ms` are dropped in the same
    /// transaction, at most once a minute of `prune_before_ms`, which bounds the table by
    /// what can still verify plus a minute of commands. (Dropping an expired id early or
    /// late changes nothing: the gate refuses an expired command before it gets here.)
    pub fn remember_command(
        &self,
        id: &str,
        expires_ms: u64,
        prune_before_ms: u64,
    ) -> Result<bool, OutboxError> {
        let txn = begin_durable_write(&self.db)?;
        let new = {
            let mut seen = txn.open_table(SEEN_COMMANDS)?;
            if seen.get(id)?.is_some() {
                false
            } else {
                seen.insert(id, expires_ms)?;
                if prune_before_ms >= self.next_prune_ms.load(Ordering::Relaxed) {
                    for item in seen.extract_if(|_, exp| exp < prune_before_ms)? {
                        item?;
                    }
                    self.next_prune_ms.store(
                        prune_before_ms.saturating_add(PRUNE_EVERY_MS),
                        Ordering::Relaxed,
                    );
                }
                true
            }
        };
        if new {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(new)
    }

    /// Number of pending entries.
    pub fn len(&self) -> Result<u64, OutboxError> {
        let txn = self.db.begin_read()?;
        let entries = txn.open_table(ENTRIES)?;
        Ok(entries.len()?)
    }

    /// Whether no entry is pending.
    pub fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len()? == 0)
    }

    /// The sequence number the next [`Outbox::append`] will return.
    pub fn next_seq(&self) -> Result<u64, OutboxError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        read_next_seq(&meta)
    }
}

/// A write transaction with durability set explicitly, so a change of redb's default can
/// never silently weaken the outbox's guarantee.
fn begin_durable_write(db: &Database) -> Result<redb::WriteTransaction, OutboxError> {
    Ok(durable::begin_durable_write(db)?)
}

fn read_next_seq(meta: &impl ReadableTable<&'static str, u128>) -> Result<u64, OutboxError> {
    let raw = meta
        .get(META_NEXT_SEQ)?
        .map(|v| v.value())
        .ok_or_else(|| OutboxError::Corrupt("next_seq is missing".to_owned()))?;
    u64::try_from(raw).map_err(|_| OutboxError::Corrupt(format!("next_seq {raw} is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remembered(outbox: &Outbox) -> u64 {
        let txn = outbox.db.begin_read().unwrap();
        txn.open_table(SEEN_COMMANDS).unwrap().len().unwrap()
    }

    #[test]
    fn expired_command_ids_are_pruned_once_a_minute_and_replays_still_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
        // The first command prunes (nothing yet); the next prune is due a minute later.
        assert!(outbox.remember_command("a", 1_000, 0).unwrap());
        assert!(outbox.remember_command("b", 100_000, 2_000).unwrap());
        assert!(outbox.remember_command("c", 200_000, 59_999).unwrap());
        assert_eq!(
            remembered(&outbox),
            3,
            "\"a\" expired but waits for the next prune"
        );
        assert!(
            !outbox.remember_command("c", 200_000, 59_999).unwrap(),
            "a replay"
        );
        assert!(outbox.remember_command("d", 200_000, 60_000).unwrap());
        assert_eq!(remembered(&outbox), 3, "\"a\" pruned");
        assert!(outbox.remember_command("e", 200_000, 119_999).unwrap());
        assert_eq!(remembered(&outbox), 4);
        assert!(outbox.remember_command("f", 200_000, 120_000).unwrap());
        assert_eq!(remembered(&outbox), 4, "\"b\" pruned");
        assert!(
            !outbox.remember_command("d", 200_000, 120_000).unwrap(),
            "a replay"
        );
    }

    #[test]
    fn message_id_format_is_subject_safe() {
        let id = MessageId {
            instance: 0xabc,
            seq: 42,
        };
        let s = id.to_string();
        assert_eq!(s, "00000000000000000000000000000abc-42");
        assert!(messages::UserId::new(&s).is_ok());
        assert_eq!(MessageId::parse(&s), Some(id));
        for bad in [
            "",
            "-1",
            "abc",
            "xyz-1",
            "abc-",
            "abc-x",
            &format!("{}-1", "f".repeat(33)),
        ] {
            assert_eq!(MessageId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn append_with_embeds_the_entrys_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
        let seq = outbox
            .append_with::<OutboxError>("result", |id| Ok(id.to_string().into_bytes()))
            .unwrap();
        let entries = outbox.pending(10).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].seq, seq);
        assert_eq!(
            entries[0].payload,
            outbox.message_id(seq).to_string().into_bytes()
        );
        // A failing build writes nothing and does not consume a sequence.
        let next = outbox.next_seq().unwrap();
        let failed = outbox.append_with("result", |_| Err(OutboxError::SequenceExhausted));
        assert!(failed.is_err());
        assert_eq!(outbox.next_seq().unwrap(), next);
        assert_eq!(outbox.len().unwrap(), 1);
    }
}
