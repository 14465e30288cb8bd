//! Recovery after a reconnect (ADR 0017): reads what a client missed from the history
//! stream (`WS_HISTORY`, kept by ws-api) and turns it into push frames, and tells a
//! session which live pushes the replay already covered.
//!
//! A replay is asked for with the client's last position in one stream (epoch, offset)
//! and is answered from the stream's last message on that subject: the same epoch and at
//! most `max_replay` pushes behind means the missed pushes are read one by one (a binary
//! search over stream sequences finds the first, since stream sequences are global but
//! per-subject offsets grow with them), checked to be contiguous, and returned as frames;
//! anything else (another epoch, a gap the stream no longer holds, a longer gap, a read
//! failure) is `recovered: false` with nothing replayed. The session holds live pushes
//! while a replay runs and drops those the replay delivered ([`Dedupe`]), so the client
//! gets every missed push once, in order, then the live stream.
//!
//! Only streams the connection may receive live are ever replayed: its own user's, and a
//! room's after the services accepted its join; the caller decides which.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use bytes::{Bytes, BytesMut};
use messages::envelope::PushEnvelope;
use messages::frame::{Position, StreamRef, encode_positioned, encoded_len};
use messages::payload::{self, JoinSince, Recovery};
use messages::{Frame, FrameHeader, FrameKind, Limits, UserId, subject};
use servicekit::clock::now_ms;

/// The longest a replay may take before it is given up (`recovered: false`).
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a replay found: the answer for the client and the frames to send it.
#[derive(Debug)]
pub struct Replay {
    /// The answer (the body of the join's ack, or the welcome's `recovery`).
    pub recovery: Recovery,
    /// Missed pushes, oldest first, as complete WebSocket messages.
    pub frames: Vec<Bytes>,
    /// The stream, for deduplicating live pushes held meanwhile.
    pub stream: StreamRef,
}

impl Replay {
    fn refused(stream: StreamRef, epoch: u64, offset: u64) -> Self {
        Replay {
            recovery: Recovery {
                recovered: false,
                epoch,
                offset,
            },
            frames: Vec::new(),
            stream,
        }
    }

    /// The deduplication rule for live pushes of this stream held during the replay:
    /// after a successful replay, pushes up to its last offset were delivered.
    pub fn dedupe(&self) -> Option<Dedupe> {
        self.recovery.recovered.then(|| Dedupe {
            stream: self.stream.clone(),
            epoch: self.recovery.epoch,
            through: self.recovery.offset,
        })
    }
}

/// Live pushes of `stream` in `epoch` up to `through` were already sent by a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dedupe {
    stream: StreamRef,
    epoch: u64,
    through: u64,
}

/// What to do with one held or live push given the pending deduplication rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it.
    Send,
    /// A duplicate of a replayed push: drop it.
    Drop,
}

/// Applies `rules` to one push (a complete WebSocket message). A push past a rule's offset
/// retires that rule: the stream's order guarantees no older push follows it.
pub fn judge(rules: &mut Vec<Dedupe>, message: &[u8]) -> Verdict {
    if rules.is_empty() {
        return Verdict::Send;
    }
    let Some(position) = position_of(message) else {
        return Verdict::Send;
    };
    let Some(i) = rules.iter().position(|r| r.stream == position.stream) else {
        return Verdict::Send;
    };
    let rule = &rules[i];
    if rule.epoch == position.epoch && position.offset <= rule.through {
        return Verdict::Drop;
    }
    rules.swap_remove(i);
    Verdict::Send
}

/// The position block of a push given as a complete (unmasked, server) WebSocket message.
fn position_of(message: &[u8]) -> Option<Position> {
    let len7 = message.get(1)? & 0x7f;
    let skip = match len7 {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let frame = message.get(skip..)?;
    let limits = Limits {
        max_route_len: messages::frame::MAX_ROUTE_LEN,
        max_body_len: usize::MAX,
    };
    FrameHeader::parse(frame, &limits).ok()?.position
}

/// The history subject of a stream as seen by a connection of `user`.
fn history_subject(user: &UserId, stream: &StreamRef) -> String {
    match stream {
        StreamRef::User => subject::history_user(user),
        StreamRef::Room(room) => subject::history_room(room),
    }
}

/// Reads what a client at `since` missed in `stream`, at most `max_replay` pushes.
pub async fn replay(
    client: async_nats::Client,
    user: UserId,
    stream: StreamRef,
    since: JoinSince,
    max_replay: u64,
) -> Replay {
    let fallback = Replay::refused(stream.clone(), 0, 0);
    match tokio::time::timeout(
        REPLAY_TIMEOUT,
        read(client, &user, stream, since, max_replay),
    )
    .await
    {
        Ok(Ok(replay)) => replay,
        Ok(Err(e)) => {
            tracing::warn!(%user, error = %e, "History replay failed; answering recovered: false.");
            fallback
        }
        Err(_) => {
            tracing::warn!(%user, "History replay timed out; answering recovered: false.");
            fallback
        }
    }
}

/// A read from the history stream failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReadError(String);

fn read_err(e: impl std::fmt::Display) -> ReadError {
    ReadError(e.to_string())
}

/// One stored push: its sequence, position and the message itself.
struct Stored {
    seq: u64,
    epoch: u64,
    offset: u64,
    msg: jetstream::message::StreamMessage,
}

async fn next_on(
    stream: &jetstream::stream::Stream<()>,
    subject: &str,
    from: u64,
) -> Result<Option<Stored>, ReadError> {
    match stream
        .direct_get_next_for_subject(subject, Some(from.max(1)))
        .await
    {
        Ok(msg) => stored(msg).map(Some),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_err(e)),
    }
}

fn no_stream_or_message(kind: &DirectGetErrorKind) -> bool {
    match kind {
        DirectGetErrorKind::NotFound => true,
        DirectGetErrorKind::ErrorResponse(code, _) => {
            *code == async_nats::StatusCode::NO_RESPONDERS
        }
        _ => false,
    }
}

fn stored(msg: jetstream::message::StreamMessage) -> Result<Stored, ReadError> {
    let envelope = PushEnvelope::from_headers(&msg.headers).map_err(read_err)?;
    let (epoch, offset) = envelope
        .position
        .ok_or_else(|| ReadError(format!("message {} has no position", msg.sequence)))?;
    Ok(Stored {
        seq: msg.sequence,
        epoch,
        offset,
        msg,
    })
}

async fn read(
    client: async_nats::Client,
    user: &UserId,
    stream_ref: StreamRef,
    since: JoinSince,
    max_replay: u64,
) -> Result<Replay, ReadError> {
    let js = jetstream::new(client);
    let stream = js
        .get_stream_no_info(subject::HISTORY_STREAM)
        .await
        .map_err(read_err)?;
    let subject = history_subject(user, &stream_ref);
    let last = match stream.direct_get_last_for_subject(subject.as_str()).await {
        Ok(msg) => stored(msg)?,
        // Nothing kept (no history for this namespace, or all of it aged out), or no
        // history stream at all (history is off): an answer, not a failure to log.
        Err(e) if no_stream_or_message(&e.kind()) => {
            return Ok(Replay::refused(stream_ref, 0, 0));
        }
        Err(e) => return Err(read_err(e)),
    };
    let (epoch, top) = (last.epoch, last.offset);
    if epoch != since.epoch || since.offset > top || top - since.offset > max_replay {
        return Ok(Replay::refused(stream_ref, epoch, top));
    }
    let mut replay = Replay {
        recovery: Recovery {
            recovered: true,
            epoch,
            offset: top,
        },
        frames: Vec::new(),
        stream: stream_ref,
    };
    if since.offset == top {
        return Ok(replay);
    }
    // The first stored push after the client's offset: sequences and offsets grow together
    // on one subject, so a binary search over sequences finds it.
    let (mut lo, mut hi) = (1, last.seq);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let Some(found) = next_on(&stream, &subject, mid).await? else {
            break;
        };
        // Every sequence in mid..=found.seq leads to `found`: on the subject, offsets do
        // not decrease as sequences grow.
        if found.offset > since.offset {
            hi = mid;
        } else {
            lo = found.seq + 1;
        }
    }
    let mut seq = hi;
    let mut expected = since.offset + 1;
    while expected <= top {
        let Some(found) = next_on(&stream, &subject, seq).await? else {
            return Ok(Replay::refused(replay.stream, epoch, top));
        };
        if found.epoch != epoch || found.offset != expected {
            // The stream no longer holds the start of the gap (count or age bound).
            return Ok(Replay::refused(replay.stream, epoch, top));
        }
        if let Some(frame) = frame(&found, &replay.stream) {
            replay.frames.push(frame);
        }
        seq = found.seq + 1;
        expected += 1;
    }
    Ok(replay)
}

/// A stored push as a positioned push frame (a complete WebSocket message); `None` when it
/// has expired (its offset still counts, it is just not delivered, as live).
fn frame(stored: &Stored, stream: &StreamRef) -> Option<Bytes> {
    let envelope = PushEnvelope::from_headers(&stored.msg.headers).ok()?;
    if envelope.expires_at_ms.is_some_and(|at| at < now_ms()) {
        return None;
    }
    let position = Position {
        stream: stream.clone(),
        epoch: stored.epoch,
        offset: stored.offset,
    };
    let body = &stored.msg.payload;
    let len = encoded_len(false, envelope.route.len(), body.len()) + position.wire_len();
    let mut buf = BytesMut::with_capacity(len + crate::ws::MAX_HEADER);
    crate::ws::put_binary_header(&mut buf, len);
    encode_positioned(
        &mut buf,
        FrameKind::Push,
        envelope.flags(),
        envelope.msg_id,
        None,
        Some(&position),
        &envelope.route,
        body,
    );
    Some(buf.freeze())
}

/// What a connection asked for in its upgrade request's query (ADR 0017):
/// `positions=1` (push frames from history streams carry their position block) and
/// `since=<epoch>:<offset>` (recover the user stream from there; implies positions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnRecovery {
    /// Push frames from history streams carry their position.
    pub positions: bool,
    /// Where the client left its user stream, when it asks to recover it.
    pub user_since: Option<JoinSince>,
}

impl ConnRecovery {
    /// Reads `positions` and `since` from the decoded query pairs; a malformed `since` is
    /// an error (the client asked for something this gateway cannot tell it about).
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut out = ConnRecovery::default();
        for (key, value) in pairs {
            match key.as_str() {
                "positions" => out.positions |= value == "1" || value == "true",
                "since" => {
                    let parsed = value
                        .split_once(':')
                        .and_then(|(e, o)| Some((e.parse().ok()?, o.parse().ok()?)));
                    let Some((epoch, offset)) = parsed else {
                        return Err(format!(
                            "since={value:?}: expected <epoch>:<offset>, decimal"
                        ));
                    };
                    out.user_since = Some(JoinSince { epoch, offset });
                    out.positions = true;
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// A connection's recovery state: joins waiting for their replay, the live pushes held
/// meanwhile, and the rules that drop live pushes a replay already sent.
#[derive(Debug, Default)]
pub struct Recovering {
    /// What the connection asked for at connect.
    pub conn: ConnRecovery,
    /// Joins that asked for recovery and are not answered yet: message id and position.
    joins: Vec<(u64, JoinSince)>,
    /// Live pushes that arrived while a join's replay was pending, in order.
    held: VecDeque<Bytes>,
    /// Live pushes that replays already covered.
    pub dedupe: Vec<Dedupe>,
}

impl Recovering {
    /// Nothing pending.
    pub fn new(conn: ConnRecovery) -> Self {
        Recovering {
            conn,
            ..Default::default()
        }
    }

    /// A join frame: on a connection with positions, a body names the client's position
    /// in the room's stream and the join's answer will include the replay. Live pushes
    /// are held from now until that answer. An undecodable body is an error.
    pub fn join_requested(&mut self, frame: &Frame) -> Result<(), String> {
        if frame.body.is_empty() || frame.msg_id == 0 || !self.conn.positions {
            return Ok(());
        }
        let since: JoinSince = payload::decode_body(frame.flags.codec(), &frame.body)
            .map_err(|e| format!("join body: {e}"))?;
        self.joins.retain(|(id, _)| *id != frame.msg_id);
        self.joins.push((frame.msg_id, since));
        Ok(())
    }

    /// The position a pending join asked to recover from.
    pub fn since_of(&self, msg_id: u64) -> Option<JoinSince> {
        self.joins
            .iter()
            .find(|(id, _)| *id == msg_id)
            .map(|(_, since)| *since)
    }

    /// The join failed; whether it was one waiting for a replay.
    pub fn abandon(&mut self, msg_id: u64) -> bool {
        self.finish(msg_id)
    }

    /// The join's replay is done; whether it was still pending.
    pub fn finish(&mut self, msg_id: u64) -> bool {
        let before = self.joins.len();
        self.joins.retain(|(id, _)| *id != msg_id);
        self.joins.len() != before
    }

    /// Live pushes from the inbox: held while a replay is pending (nothing to send now),
    /// otherwise those to send. `None` when more than `limit` are held (a slow consumer).
    pub fn admit(&mut self, pushes: VecDeque<Bytes>, limit: usize) -> Option<VecDeque<Bytes>> {
        if !self.joins.is_empty() {
            self.held.extend(pushes);
            return (self.held.len() <= limit).then(VecDeque::new);
        }
        Some(self.filter(pushes))
    }

    /// The held pushes to send once no replay is pending (`None` while one is).
    pub fn release(&mut self) -> Option<VecDeque<Bytes>> {
        if !self.joins.is_empty() {
            return None;
        }
        let held = std::mem::take(&mut self.held);
        Some(self.filter(held))
    }

    fn filter(&mut self, pushes: VecDeque<Bytes>) -> VecDeque<Bytes> {
        if self.dedupe.is_empty() {
            return pushes;
        }
        pushes
            .into_iter()
            .filter(|p| judge(&mut self.dedupe, p) == Verdict::Send)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use messages::RoomId;

    fn positioned(stream: StreamRef, epoch: u64, offset: u64) -> Bytes {
        let position = Position {
            stream,
            epoch,
            offset,
        };
        let route = messages::Route::new("r").unwrap();
        let len = encoded_len(false, route.len(), 2) + position.wire_len();
        let mut buf = BytesMut::new();
        crate::ws::put_binary_header(&mut buf, len);
        encode_positioned(
            &mut buf,
            FrameKind::Push,
            messages::Flags::new(messages::BodyCodec::Json),
            0,
            None,
            Some(&position),
            &route,
            b"{}",
        );
        buf.freeze()
    }

    #[test]
    fn held_pushes_the_replay_covered_are_dropped_and_later_ones_retire_the_rule() {
        let lobby = StreamRef::Room(RoomId::new("chat.lobby").unwrap());
        let other = StreamRef::Room(RoomId::new("chat.other").unwrap());
        let mut rules = vec![Dedupe {
            stream: lobby.clone(),
            epoch: 7,
            through: 10,
        }];
        assert_eq!(judge(&mut rules, &positioned(other, 7, 3)), Verdict::Send);
        assert_eq!(
            judge(&mut rules, &positioned(StreamRef::User, 7, 3)),
            Verdict::Send
        );
        assert_eq!(
            judge(&mut rules, &positioned(lobby.clone(), 7, 9)),
            Verdict::Drop
        );
        assert_eq!(
            judge(&mut rules, &positioned(lobby.clone(), 7, 10)),
            Verdict::Drop
        );
        assert_eq!(rules.len(), 1);
        assert_eq!(
            judge(&mut rules, &positioned(lobby.clone(), 7, 11)),
            Verdict::Send
        );
        assert!(rules.is_empty());
        assert_eq!(judge(&mut rules, &positioned(lobby, 7, 5)), Verdict::Send);
    }

    #[test]
    fn live_pushes_wait_behind_a_pending_replay_and_the_replayed_ones_are_dropped() {
        let lobby = StreamRef::Room(RoomId::new("chat.lobby").unwrap());
        let mut r = Recovering::new(ConnRecovery {
            positions: true,
            user_since: None,
        });
        let join = Frame::new(FrameKind::Join)
            .with_msg_id(5)
            .with_route(messages::Route::new("chat.lobby").unwrap())
            .with_body(
                messages::BodyCodec::Json,
                &br#"{"epoch": 7, "offset": 2}"#[..],
            );
        r.join_requested(&join).unwrap();
        assert_eq!(
            r.since_of(5),
            Some(JoinSince {
                epoch: 7,
                offset: 2
            })
        );
        // Held: nothing to send while the replay is pending, and no release yet.
        let live: VecDeque<Bytes> = (3..=6)
            .map(|o| positioned(lobby.clone(), 7, o))
            .chain([positioned(StreamRef::User, 1, 1)])
            .collect();
        assert_eq!(r.admit(live, 100), Some(VecDeque::new()));
        assert_eq!(r.release(), None);
        // The replay covered offsets 3 and 4.
        assert!(r.finish(5));
        r.dedupe.push(Dedupe {
            stream: lobby.clone(),
            epoch: 7,
            through: 4,
        });
        let released = r.release().unwrap();
        let offsets: Vec<u64> = released
            .iter()
            .map(|m| position_of(m).unwrap().offset)
            .collect();
        assert_eq!(offsets, vec![5, 6, 1]);
        // Too many held is a slow consumer.
        r.join_requested(&join).unwrap();
        let many: VecDeque<Bytes> = (0..3)
            .map(|o| positioned(lobby.clone(), 7, o + 10))
            .collect();
        assert_eq!(r.admit(many, 2), None);
        // A body on a connection without positions asks for nothing; a bad one is an error.
        let mut plain = Recovering::new(ConnRecovery::default());
        plain.join_requested(&join).unwrap();
        assert_eq!(plain.since_of(5), None);
        let bad = join
            .clone()
            .with_body(messages::BodyCodec::Json, &b"[1]"[..]);
        assert!(r.join_requested(&bad).is_err());
    }

    #[test]
    fn since_in_the_query_asks_for_the_user_stream_and_implies_positions() {
        let q = |s: &str| vec![("since".to_owned(), s.to_owned())];
        assert_eq!(
            ConnRecovery::from_query(&q("7:12")),
            Ok(ConnRecovery {
                positions: true,
                user_since: Some(JoinSince {
                    epoch: 7,
                    offset: 12
                })
            })
        );
        assert!(ConnRecovery::from_query(&q("7")).is_err());
        assert!(ConnRecovery::from_query(&q("a:1")).is_err());
        let p = vec![("positions".to_owned(), "1".to_owned())];
        assert!(ConnRecovery::from_query(&p).unwrap().positions);
    }

    #[test]
    fn a_push_without_position_is_always_sent() {
        let mut rules = vec![Dedupe {
            stream: StreamRef::User,
            epoch: 1,
            through: 1,
        }];
        let plain = crate::ws::binary(
            &messages::Frame::new(FrameKind::Push)
                .with_body(messages::BodyCodec::Json, &b"{}"[..])
                .encode(),
        );
        assert_eq!(judge(&mut rules, &plain), Verdict::Send);
        assert_eq!(rules.len(), 1);
    }
}
