//! Message history (ADR 0017): pushes to rooms and users whose namespace keeps history go
//! through the JetStream stream `WS_HISTORY` instead of straight to the gateways, each
//! stamped with its stream's epoch and a per-stream offset (1, 2, 3, ... without gaps).
//!
//! A push for room `r` is appended to `wsh.room.r` with `ws-epoch` / `ws-offset` and
//! `Nats-Expected-Last-Subject-Sequence` set to the sequence of the last message this
//! replica believes is on that subject. The stream refuses the append if anyone (another
//! replica, another request) appended since, and this module re-reads the subject's last
//! message and tries again, so no two pushes ever get the same offset and offsets follow
//! the stream's order. The stream republishes every message it stored from `wsh.<rest>`
//! to `ws.<rest>`, which is what gateways subscribe to: live delivery sees exactly the
//! stored messages, in the stream's order, whichever replica appended them.
//!
//! The epoch is chosen at random when a subject has no message (a new room, a purged or
//! recreated stream, or every message aged out): offsets of an older epoch can then never
//! be mistaken for the new one's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use messages::{RoomId, UserId, headers, subject};

/// How often one append is retried after losing the race for the subject's tail.
const MAX_ATTEMPTS: usize = 64;
/// Subjects whose tail a replica remembers; past this, idle entries are forgotten.
const MAX_CACHED: usize = 50_000;

/// Why a push could not be kept in history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The stream could not be created or read.
    #[error("history stream: {0}")]
    Stream(String),
    /// The append was refused or timed out.
    #[error("history append: {0}")]
    Append(String),
    /// Other writers kept winning the race for the subject's tail.
    #[error("history append: lost the race for the tail {MAX_ATTEMPTS} times")]
    Contended,
}

/// Which namespaces keep history, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Room id prefixes whose rooms keep history (`*` for every room).
    pub room_prefixes: Vec<String>,
    /// Whether pushes to users keep history.
    pub users: bool,
    /// Pushes kept per stream (per room, per user); also the longest gap a client can
    /// recover.
    pub max_per_stream: i64,
    /// How long a push is kept.
    pub max_age: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            room_prefixes: Vec::new(),
            users: false,
            max_per_stream: 1000,
            max_age: Duration::from_secs(3600),
        }
    }
}

impl HistoryConfig {
    /// Whether anything keeps history (else no stream is made).
    pub fn enabled(&self) -> bool {
        self.users || !self.room_prefixes.is_empty()
    }

    /// Whether pushes to `room` keep history.
    pub fn keeps_room(&self, room: &RoomId) -> bool {
        self.room_prefixes
            .iter()
            .any(|p| p == "*" || room.as_str().starts_with(p.as_str()))
    }
}

/// The last message of one subject, as this replica last saw it.
#[derive(Debug, Clone, Copy)]
struct Tail {
    seq: u64,
    epoch: u64,
    offset: u64,
}

/// Handle to the history stream; cheap to share.
#[derive(Debug)]
pub struct History {
    config: HistoryConfig,
    js: jetstream::Context,
    stream: Option<stream::Stream>,
    /// Per subject: its tail, behind a lock that orders this replica's appends to it.
    tails: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Tail>>>>>,
}

impl History {
    /// Creates (or updates to `config`) the stream when any namespace keeps history.
    pub async fn open(
        js: &jetstream::Context,
        config: HistoryConfig,
        replicas: usize,
    ) -> Result<Self, HistoryError> {
        let stream = if config.enabled() {
            let (src, dest) = subject::HISTORY_REPUBLISH;
            let stream_config = stream::Config {
                name: subject::HISTORY_STREAM.into(),
                subjects: subject::HISTORY_SUBJECTS.map(String::from).to_vec(),
                max_messages_per_subject: config.max_per_stream,
                max_age: config.max_age,
                num_replicas: replicas.max(1),
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                allow_direct: true,
                republish: Some(stream::Republish {
                    source: src.into(),
                    destination: dest.into(),
                    headers_only: false,
                }),
                ..Default::default()
            };
            js.create_or_update_stream(stream_config)
                .await
                .map_err(|e| HistoryError::Stream(e.to_string()))?;
            Some(
                js.get_stream(subject::HISTORY_STREAM)
                    .await
                    .map_err(|e| HistoryError::Stream(e.to_string()))?,
            )
        } else {
            None
        };
        Ok(History {
            config,
            js: js.clone(),
            stream,
            tails: Mutex::default(),
        })
    }

    /// The history subject for a room push, if its namespace keeps history.
    pub fn room_subject(&self, room: &RoomId) -> Option<String> {
        (self.stream.is_some() && self.config.keeps_room(room)).then(|| subject::history_room(room))
    }

    /// The history subject for a user push, if users keep history.
    pub fn user_subject(&self, user: &UserId) -> Option<String> {
        (self.stream.is_some() && self.config.users).then(|| subject::history_user(user))
    }

    fn tail_lock(&self, subject: &str) -> Arc<tokio::sync::Mutex<Option<Tail>>> {
        let mut tails = self.tails.lock().unwrap_or_else(|e| e.into_inner());
        if tails.len() >= MAX_CACHED {
            // Forget subjects nobody is appending to right now; they are re-read on use.
            tails.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        Arc::clone(tails.entry(subject.to_owned()).or_default())
    }

    /// The last message on `subject`, read from the stream.
    async fn read_tail(&self, subject: &str) -> Result<Option<Tail>, HistoryError> {
        let Some(stream) = &self.stream else {
            return Ok(None);
        };
        match stream.direct_get_last_for_subject(subject).await {
            Ok(msg) => {
                let (epoch, offset) = position_of(&msg.headers).ok_or_else(|| {
                    HistoryError::Stream(format!("message {} has no position", msg.sequence))
                })?;
                Ok(Some(Tail {
                    seq: msg.sequence,
                    epoch,
                    offset,
                }))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(HistoryError::Stream(e.to_string())),
        }
    }

    /// Appends a push to `subject` with the next offset; returns its epoch and offset.
    /// `headers` are the push's headers; the position is added here.
    pub async fn append(
        &self,
        subject: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(u64, u64), HistoryError> {
        let lock = self.tail_lock(subject);
        let mut tail = lock.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let current = match *tail {
                Some(t) => Some(t),
                None => self.read_tail(subject).await?,
            };
            let (epoch, offset, expected) = match current {
                Some(t) => (t.epoch, t.offset + 1, t.seq),
                None => (new_epoch(), 1, 0),
            };
            let mut map = headers.clone();
            let _ = headers::set(&mut map, headers::EPOCH, &epoch.to_string());
            let _ = headers::set(&mut map, headers::OFFSET, &offset.to_string());
            let _ = headers::set(
                &mut map,
                headers::JS_EXPECTED_LAST_SUBJECT_SEQ,
                &expected.to_string(),
            );
            let ack = self
                .js
                .publish_with_headers(subject.to_owned(), map, body.clone())
                .await
                .map_err(|e| HistoryError::Append(e.to_string()))?
                .await;
            match ack {
                Ok(ack) => {
                    *tail = Some(Tail {
                        seq: ack.sequence,
                        epoch,
                        offset,
                    });
                    return Ok((epoch, offset));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Someone appended (or the tail aged out) since we looked: look again.
                    *tail = None;
                }
                Err(e) => {
                    *tail = None;
                    return Err(HistoryError::Append(e.to_string()));
                }
            }
        }
        Err(HistoryError::Contended)
    }
}

/// The `ws-epoch` and `ws-offset` of a stored push.
fn position_of(map: &HeaderMap) -> Option<(u64, u64)> {
    let epoch = headers::get(map, headers::EPOCH)?.parse().ok()?;
    let offset = headers::get(map, headers::OFFSET)?.parse().ok()?;
    Some((epoch, offset))
}

/// A fresh epoch: random, non-zero, below 2^53 so JavaScript numbers hold it exactly.
fn new_epoch() -> u64 {
    loop {
        let epoch = rand::random::<u64>() >> 11;
        if epoch != 0 {
            return epoch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_select_rooms_and_a_star_selects_all() {
        let config = HistoryConfig {
            room_prefixes: vec!["chat.".into()],
            ..Default::default()
        };
        assert!(config.keeps_room(&RoomId::new("chat.lobby").unwrap()));
        assert!(!config.keeps_room(&RoomId::new("game.1").unwrap()));
        let all = HistoryConfig {
            room_prefixes: vec!["*".into()],
            ..Default::default()
        };
        assert!(all.keeps_room(&RoomId::new("game.1").unwrap()));
        assert!(!HistoryConfig::default().enabled());
    }

    #[test]
    fn epochs_are_non_zero_and_fit_a_javascript_number() {
        for _ in 0..1000 {
            let e = new_epoch();
            assert!(e != 0 && e < (1 << 53));
        }
    }
}
