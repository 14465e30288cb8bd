//! The session and presence registry: who is connected, through which gateway, in which
//! rooms, last seen when.
//!
//! The source of truth is a JetStream KV bucket with one record per socket (`s.<socket>`),
//! written by whichever replica handles an event (queue group) with compare-and-set, so
//! concurrent updates from different replicas never overwrite each other. Every replica
//! keeps an in-memory view fed by a KV watch (with history, so a new replica starts from
//! the current state) and answers queries and push targeting from it; replicas therefore
//! hold nothing another would need.
//!
//! Lost sessions: a last-seen refresh lost on the bus (a NATS node loss) can let a live
//! session's record age out. A batch that names a socket this registry has no record of
//! therefore yields that socket as missing, and the caller asks its gateway to announce it
//! again (`resync` with the socket ids): the record comes back, rooms included, within one
//! sync period. Sockets minted within [`SETTLE`] of the batch are not asked for: their
//! connect event is normally still on its way.
//!
//! Ghosts: a gateway that dies sends no disconnects. Records carry the last time a gateway
//! reported the socket (heartbeat batches); the sweep deletes records older than the
//! presence TTL, so a dead gateway's sessions vanish within TTL + sweep period. The bucket's
//! max age (twice the TTL) is a backstop if no replica sweeps.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;
use messages::payload::{self, SessionEvent};
use messages::{ClientKind, GatewayId, RoomId, SocketId, UserId};
use serde::{Deserialize, Serialize};
use servicekit::clock::now_ms;

/// How long after its socket id was minted a socket missing from the registry is taken
/// for a lost record rather than a connect event still being handled.
pub(crate) const SETTLE: Duration = Duration::from_secs(10);

/// What a last-seen batch did.
#[derive(Debug, Default)]
pub struct Seen {
    /// Sockets the gateway vouched for that have no record (see the module documentation).
    pub missing: Vec<SocketId>,
    /// The first refresh that failed; every other socket was still tried.
    pub error: Option<PresenceError>,
}

/// One socket as the system knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Socket id.
    pub socket_id: SocketId,
    /// Owner.
    pub user_id: UserId,
    /// Client kind.
    pub kind: ClientKind,
    /// Holding gateway.
    pub gateway: GatewayId,
    /// Rooms the socket is in.
    #[serde(default)]
    pub rooms: Vec<RoomId>,
    /// Rooms the token allows.
    #[serde(default)]
    pub allowed_rooms: Vec<String>,
    /// Unix ms of the connect.
    pub connected_at_ms: u64,
    /// Unix ms a gateway last reported activity.
    pub last_seen_ms: u64,
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// A KV operation failed.
    #[error("session store: {0}")]
    Store(String),
    /// A record could not be encoded or decoded.
    #[error("session record: {0}")]
    Codec(#[from] payload::PayloadError),
}

fn store_err(e: impl std::fmt::Display) -> PresenceError {
    PresenceError::Store(e.to_string())
}

/// The in-memory view, rebuilt from the KV watch.
#[derive(Debug, Default)]
struct View {
    sockets: HashMap<SocketId, SessionRecord>,
    users: HashMap<UserId, HashSet<SocketId>>,
    rooms: HashMap<RoomId, HashSet<SocketId>>,
}

impl View {
    fn upsert(&mut self, record: SessionRecord) {
        let id = record.socket_id;
        self.remove(id);
        self.users
            .entry(record.user_id.clone())
            .or_default()
            .insert(id);
        for room in &record.rooms {
            self.rooms.entry(room.clone()).or_default().insert(id);
        }
        self.sockets.insert(id, record);
    }

    fn remove(&mut self, id: SocketId) -> Option<SessionRecord> {
        let old = self.sockets.remove(&id)?;
        if let Some(set) = self.users.get_mut(&old.user_id) {
            set.remove(&id);
            if set.is_empty() {
                self.users.remove(&old.user_id);
            }
        }
        for room in &old.rooms {
            if let Some(set) = self.rooms.get_mut(room) {
                set.remove(&id);
                if set.is_empty() {
                    self.rooms.remove(room);
                }
            }
        }
        Some(old)
    }
}

/// Handle to the registry; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Presence {
    kv: kv::Store,
    view: RwLock<View>,
    ttl: Duration,
}

fn key(id: SocketId) -> String {
    format!("s.{id}")
}

impl Presence {
    /// Opens (or creates) the bucket and starts the watch that feeds the view.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Arc<Self>, PresenceError> {
        let config = kv::Config {
            bucket: bucket.to_owned(),
            history: 1,
            max_age: ttl * 2,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let kv = match js.create_key_value(config).await {
            Ok(kv) => kv,
            // Exists with other settings (another replica's flags): use it as it is.
            Err(_) => js.get_key_value(bucket).await.map_err(store_err)?,
        };
        let presence = Arc::new(Presence {
            kv,
            view: RwLock::new(View::default()),
            ttl,
        });
        let watch = presence
            .kv
            .watch_with_history(">")
            .await
            .map_err(store_err)?;
        tokio::spawn(feed(Arc::downgrade(&presence), watch));
        Ok(presence)
    }

    /// Records a connect, or a gateway's re-announce of a socket (which carries its rooms
    /// and original connect time, and replaces whatever record there was).
    pub async fn connected(&self, event: &SessionEvent) -> Result<(), PresenceError> {
        let record = SessionRecord {
            socket_id: event.socket_id,
            user_id: event.user_id.clone(),
            kind: event.kind,
            gateway: event.gateway.clone(),
            rooms: event.rooms.clone(),
            allowed_rooms: event.allowed_rooms.clone(),
            connected_at_ms: event.connected_at_ms.unwrap_or(event.at_ms),
            last_seen_ms: event.at_ms.max(now_ms()),
        };
        let bytes = Bytes::from(payload::to_bus(&record)?);
        self.kv
            .put(key(record.socket_id), bytes)
            .await
            .map_err(store_err)?;
        // Apply locally at once; the watch confirms it (idempotently) a moment later.
        self.write_view().upsert(record);
        Ok(())
    }

    /// Records a disconnect.
    pub async fn disconnected(&self, id: SocketId) -> Result<(), PresenceError> {
        self.kv.delete(key(id)).await.map_err(store_err)?;
        self.write_view().remove(id);
        Ok(())
    }

    /// Applies `change` to a record with compare-and-set, retrying on conflicts with other
    /// replicas. Returns the new record, or `None` when the socket is unknown.
    pub async fn modify(
        &self,
        id: SocketId,
        mut change: impl FnMut(&mut SessionRecord),
    ) -> Result<Option<SessionRecord>, PresenceError> {
        for _ in 0..8 {
            let Some(entry) = self.kv.entry(key(id)).await.map_err(store_err)? else {
                return Ok(None);
            };
            if entry.operation != Operation::Put {
                return Ok(None);
            }
            let mut record: SessionRecord = payload::from_bus(&entry.value)?;
            change(&mut record);
            let bytes = Bytes::from(payload::to_bus(&record)?);
            match self.kv.update(key(id), bytes, entry.revision).await {
                Ok(_) => {
                    self.write_view().upsert(record.clone());
                    return Ok(Some(record));
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
        Err(PresenceError::Store(format!(
            "record of socket {id} kept changing; gave up"
        )))
    }

    /// Refreshes last-seen times from a gateway's batch. Gateways vouch for every socket each
    /// sync period, but a record only needs rewriting before it could age past the TTL, so
    /// records refreshed within the last half TTL are left alone (a KV read and write saved
    /// per socket per batch). With the gateway's default sync period (10 s) and TTL (45 s)
    /// a record is rewritten every 30 s and has two batches to be refreshed by before the
    /// sweep (docs/operations.md).
    ///
    /// Every socket of the batch is tried even when one fails: a failure that ended the
    /// batch left the rest of it unrefreshed. Sockets with no record come back as
    /// [`Seen::missing`] (see the module documentation).
    pub async fn seen(&self, seen: &[(SocketId, u64)]) -> Seen {
        let fresh_for = u64::try_from(self.ttl.as_millis() / 2).unwrap_or(u64::MAX);
        let settle = u64::try_from(SETTLE.as_millis()).unwrap_or(u64::MAX);
        let mut out = Seen::default();
        for &(id, at) in seen {
            let Some(record) = self.get(id) else {
                if id.parts().unix_ms.saturating_add(settle) <= at {
                    out.missing.push(id);
                }
                continue;
            };
            if at < record.last_seen_ms.saturating_add(fresh_for) {
                continue;
            }
            match self
                .modify(id, |r| r.last_seen_ms = r.last_seen_ms.max(at))
                .await
            {
                // Deleted meanwhile (swept, or by another replica): as missing.
                Ok(None) => out.missing.push(id),
                Ok(Some(_)) => {}
                Err(e) => {
                    out.error.get_or_insert(e);
                }
            }
        }
        out
    }

    /// Deletes records not seen within the TTL; returns how many.
    pub async fn sweep(&self) -> usize {
        let cutoff =
            now_ms().saturating_sub(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX));
        let stale: Vec<SocketId> = self
            .read_view()
            .sockets
            .values()
            .filter(|r| r.last_seen_ms < cutoff)
            .map(|r| r.socket_id)
            .collect();
        for id in &stale {
            if let Err(e) = self.disconnected(*id).await {
                tracing::warn!(socket_id = %id, error = %e, "Sweeping a stale session failed.");
            }
        }
        stale.len()
    }

    /// One socket.
    pub fn get(&self, id: SocketId) -> Option<SessionRecord> {
        self.read_view().sockets.get(&id).cloned()
    }

    /// A user's sockets.
    pub fn user(&self, user: &UserId) -> Vec<SessionRecord> {
        let view = self.read_view();
        let mut out: Vec<_> = view
            .users
            .get(user)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| view.sockets.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|r| r.socket_id);
        out
    }

    /// A room's members.
    pub fn room(&self, room: &RoomId) -> Vec<SessionRecord> {
        let view = self.read_view();
        let mut out: Vec<_> = view
            .rooms
            .get(room)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| view.sockets.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|r| r.socket_id);
        out
    }

    /// Number of sockets of `kind` (all kinds when `None`).
    pub fn count(&self, kind: Option<ClientKind>) -> usize {
        let view = self.read_view();
        match kind {
            None => view.sockets.len(),
            Some(k) => view.sockets.values().filter(|r| r.kind == k).count(),
        }
    }

    /// Sessions, users and rooms known.
    pub fn totals(&self) -> (usize, usize, usize) {
        let view = self.read_view();
        (view.sockets.len(), view.users.len(), view.rooms.len())
    }

    /// Waits (bounded) until a socket is known: a join can be handled by one replica before
    /// the connect event handled by another has reached its view.
    pub async fn wait_for(&self, id: SocketId, wait: Duration) -> Option<SessionRecord> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(r) = self.get(id) {
                return Some(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn read_view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_view(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Applies KV changes to the view until the registry is dropped.
async fn feed(presence: std::sync::Weak<Presence>, mut watch: kv::Watch) {
    while let Some(entry) = watch.next().await {
        let Some(presence) = presence.upgrade() else {
            break;
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "Session watch error.");
                continue;
            }
        };
        let Some(id) = entry.key.strip_prefix("s.").and_then(|s| s.parse().ok()) else {
            continue;
        };
        match entry.operation {
            Operation::Put => match payload::from_bus::<SessionRecord>(&entry.value) {
                Ok(record) => presence.write_view().upsert(record),
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "Undecodable session record.");
                }
            },
            Operation::Delete | Operation::Purge => {
                presence.write_view().remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn connect_event(socket: u64) -> SessionEvent {
        SessionEvent {
            socket_id: SocketId(socket),
            user_id: UserId::new("u").unwrap(),
            kind: ClientKind::App,
            gateway: GatewayId::new("gw-1").unwrap(),
            at_ms: 1,
            allowed_rooms: Vec::new(),
            close_code: None,
            reason: None,
            via: None,
            rooms: vec![],
            connected_at_ms: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_failing_socket_does_not_keep_the_rest_of_a_batch_from_being_refreshed() {
        let nats = testkit::NatsServer::start().unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let presence = Presence::open(&js, "presence_batch", Duration::from_secs(60), 1)
            .await
            .unwrap();
        presence.connected(&connect_event(1)).await.unwrap();
        presence.connected(&connect_event(2)).await.unwrap();
        // Socket 1's stored record becomes unreadable, so refreshing it fails.
        presence
            .kv
            .put(key(SocketId(1)), Bytes::from_static(b"\xc1 not msgpack"))
            .await
            .unwrap();
        // Late enough that both records need rewriting (more than half the TTL on).
        let later = now_ms() + 31_000;
        let result = presence
            .seen(&[(SocketId(1), later), (SocketId(2), later)])
            .await;
        assert!(result.error.is_some(), "the failure is still reported");
        assert!(result.missing.is_empty());
        assert_eq!(
            presence.get(SocketId(2)).unwrap().last_seen_ms,
            later,
            "the socket after the failing one was refreshed"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vouched_socket_without_a_record_is_missing_and_its_announce_restores_it() {
        let nats = testkit::NatsServer::start().unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let presence = Presence::open(&js, "presence_missing", Duration::from_secs(60), 1)
            .await
            .unwrap();
        let now = now_ms();
        // A socket minted long ago whose record aged out, and one minted a moment ago whose
        // connect event may still be on its way.
        let old = SocketId(1);
        let generator = messages::snowflake::Snowflake::new(3).unwrap();
        let young = generator.next_id().unwrap();
        let seen = presence.seen(&[(old, now), (young, now)]).await;
        assert!(seen.error.is_none());
        assert_eq!(seen.missing, [old]);

        // The gateway's re-announce carries the rooms and the original connect time.
        let room = RoomId::new("chat.lobby").unwrap();
        let announce = SessionEvent {
            rooms: vec![room.clone()],
            connected_at_ms: Some(7),
            at_ms: now,
            ..connect_event(1)
        };
        presence.connected(&announce).await.unwrap();
        let record = presence.get(old).unwrap();
        assert_eq!(record.rooms, std::slice::from_ref(&room));
        assert_eq!(record.connected_at_ms, 7);
        assert_eq!(presence.room(&room).len(), 1);
        assert!(presence.seen(&[(old, now)]).await.missing.is_empty());
    }
}
