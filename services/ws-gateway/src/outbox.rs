//! A connection's outbound rules, apart from its actor so they can be tested without one:
//! the [`Inbox`] the fan-out hands pushes to (bounded, one wake-up per batch), and the
//! [`Outbox`] the connection writes from (bounded; the writer takes it whole; a ping is
//! answered by one pong for the latest ping only; heartbeat acks are written ahead of
//! queued pushes; a slow consumer's queue is dropped).
//!
//! The actor (`session.rs`) decides when to run a writer and what to do when a rule says
//! "slow consumer"; these types only say what the rules say.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use crate::ws;

/// Pushes waiting for the actor. A push does not travel as an actor message: the fan-out
/// appends the shared bytes here and wakes the actor only if it is not already due to
/// drain, so a burst costs one queue slot per delivery and one wake-up per batch.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Bytes>>,
    /// A drain is due (a wake-up was sent and not handled yet).
    due: AtomicBool,
    /// A push was refused because the inbox was full: the client is a slow consumer.
    overflow: AtomicBool,
}

impl Inbox {
    /// Offers a push; at most `limit` wait, past that the overflow is recorded (and the
    /// push dropped). Returns whether the caller must wake the actor.
    pub(crate) fn offer(&self, frame: Bytes, limit: usize) -> bool {
        if let Ok(mut queue) = self.queue.lock() {
            if queue.len() >= limit {
                self.overflow.store(true, Ordering::Release);
            } else {
                queue.push_back(frame);
            }
        }
        !self.due.swap(true, Ordering::AcqRel)
    }

    /// Takes everything waiting; `Err` when a push was refused (the connection must close
    /// as a slow consumer).
    pub(crate) fn take(&self) -> Result<VecDeque<Bytes>, Overflow> {
        // Cleared before taking, so a push that lands after the take wakes the actor again.
        self.due.store(false, Ordering::Release);
        let pushes = match self.queue.lock() {
            Ok(mut queue) => std::mem::take(&mut *queue),
            Err(_) => VecDeque::new(),
        };
        if self.overflow.load(Ordering::Acquire) {
            return Err(Overflow);
        }
        Ok(pushes)
    }
}

/// The client does not read fast enough: close it with 4008.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflow;

/// What a writer writes in one go.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Complete WebSocket messages, in order (a pong first if one was due, then heartbeat
    /// acks, then the queue).
    pub frames: VecDeque<Bytes>,
    /// Messages of the client's own queue in the batch, acks included (not the pong).
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The outbound queue of one connection; see the module documentation.
#[derive(Debug)]
pub(crate) struct Outbox {
    queue: VecDeque<Bytes>,
    /// Payload of the latest WebSocket ping not answered yet. RFC 6455 (5.5.3) lets an
    /// endpoint answer only the most recent ping, which bounds what a ping flood can queue.
    pong: Option<Bytes>,
    /// Heartbeat acks not written yet. They jump the queue: a backlog of pushes or tunnel
    /// data to an agent must not delay the frame that proves the gateway is alive and
    /// whose round trip the agent measures (docs/protocol.md 7.2).
    urgent: VecDeque<Bytes>,
    /// Messages the writer currently holds; they count against the limit.
    in_flight: usize,
    writing: bool,
    closing: bool,
    limit: usize,
}

impl Outbox {
    /// An empty queue holding at most `limit` messages (queued and in flight).
    pub(crate) fn new(limit: usize) -> Self {
        Outbox {
            queue: VecDeque::new(),
            pong: None,
            urgent: VecDeque::new(),
            in_flight: 0,
            writing: false,
            closing: false,
            limit,
        }
    }

    /// Queues one message; `Err` when the queue is full. Ignored once closing.
    pub(crate) fn enqueue(&mut self, frame: Bytes) -> Result<(), Overflow> {
        if self.closing {
            return Ok(());
        }
        if self.queued() + self.in_flight >= self.limit {
            return Err(Overflow);
        }
        self.queue.push_back(frame);
        Ok(())
    }

    /// Queues a heartbeat ack ahead of everything queued (after acks queued before it);
    /// `Err` when the queue is full. Ignored once closing.
    pub(crate) fn enqueue_urgent(&mut self, frame: Bytes) -> Result<(), Overflow> {
        if self.closing {
            return Ok(());
        }
        if self.queued() + self.in_flight >= self.limit {
            return Err(Overflow);
        }
        self.urgent.push_back(frame);
        Ok(())
    }

    fn queued(&self) -> usize {
        self.queue.len() + self.urgent.len()
    }

    /// Queues what the inbox held; `Err` when that passes the limit. Ignored once closing.
    pub(crate) fn extend(&mut self, pushes: VecDeque<Bytes>) -> Result<(), Overflow> {
        if self.closing || pushes.is_empty() {
            return Ok(());
        }
        if self.queued() + self.in_flight + pushes.len() > self.limit {
            return Err(Overflow);
        }
        if self.queue.is_empty() {
            self.queue = pushes;
        } else {
            self.queue.extend(pushes);
        }
        Ok(())
    }

    /// A ping to answer: replaces any pong not written yet. Ignored once closing.
    pub(crate) fn ping(&mut self, payload: Bytes) {
        if !self.closing {
            self.pong = Some(payload);
        }
    }

    /// Everything to write now, if no writer runs and something is waiting. The queue is
    /// taken whole: what a burst allocated leaves with it.
    pub(crate) fn take(&mut self) -> Option<Batch> {
        if self.writing || self.is_empty() && self.pong.is_none() {
            return None;
        }
        let mut frames = std::mem::take(&mut self.queue);
        if !self.urgent.is_empty() {
            let mut urgent = std::mem::take(&mut self.urgent);
            urgent.append(&mut frames);
            frames = urgent;
        }
        self.in_flight = frames.len();
        let count = frames.len() as u64;
        let bytes = frames.iter().map(|f| f.len() as u64).sum();
        if let Some(payload) = self.pong.take() {
            frames.push_front(ws::pong(&payload));
        }
        self.writing = true;
        Some(Batch {
            frames,
            count,
            bytes,
        })
    }

    /// The writer finished (or was cancelled).
    pub(crate) fn written(&mut self) {
        self.writing = false;
        self.in_flight = 0;
    }

    /// A close has started: no more pongs; a slow consumer's queue is dropped (it is the
    /// reason for the close), anything else is still written before the close frame.
    pub(crate) fn close(&mut self, drop_queue: bool) {
        self.closing = true;
        self.pong = None;
        if drop_queue {
            self.queue.clear();
            self.urgent.clear();
        }
    }

    /// Nothing queued and no writer running: a closing connection may send its close frame.
    pub(crate) fn idle(&self) -> bool {
        !self.writing && self.is_empty() && self.pong.is_none()
    }

    /// Messages queued, not counting those in flight.
    pub(crate) fn len(&self) -> usize {
        self.queued()
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.urgent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::transport;

    fn msg(n: u8) -> Bytes {
        ws::binary(&[n])
    }

    #[test]
    fn the_inbox_wakes_once_per_batch_and_records_an_overflow() {
        let inbox = Inbox::default();
        assert!(inbox.offer(msg(1), 2), "first push wakes the actor");
        assert!(!inbox.offer(msg(2), 2), "already due");
        assert_eq!(inbox.take().unwrap().len(), 2);
        assert!(
            inbox.offer(msg(3), 2),
            "after a take, the next push wakes again"
        );
        inbox.offer(msg(4), 2);
        inbox.offer(msg(5), 2);
        assert_eq!(inbox.take(), Err(Overflow), "the third push did not fit");
    }

    #[test]
    fn in_flight_messages_count_against_the_limit() {
        let mut out = Outbox::new(3);
        out.enqueue(msg(1)).unwrap();
        out.enqueue(msg(2)).unwrap();
        let batch = out.take().unwrap();
        assert_eq!(batch.count, 2);
        out.enqueue(msg(3)).unwrap();
        assert_eq!(out.enqueue(msg(4)), Err(Overflow), "2 in flight + 1 queued");
        assert!(out.take().is_none(), "one writer at a time");
        out.written();
        out.enqueue(msg(4)).unwrap();
        assert_eq!(
            out.extend(VecDeque::from([msg(5), msg(6)])),
            Err(Overflow),
            "a drained inbox that does not fit closes the client"
        );
    }

    #[test]
    fn a_ping_flood_queues_one_pong_for_the_latest_ping() {
        let mut out = Outbox::new(4);
        for i in 0..1000u32 {
            out.ping(Bytes::from(i.to_be_bytes().to_vec()));
        }
        out.enqueue(msg(9)).unwrap();
        let batch = out.take().unwrap();
        assert_eq!(batch.frames.len(), 2, "one pong and the message");
        assert_eq!(
            batch.frames[0],
            ws::pong(&999u32.to_be_bytes()),
            "latest ping"
        );
        assert_eq!(batch.count, 1, "the pong is not a queued message");
    }

    #[test]
    fn heartbeat_acks_are_written_ahead_of_queued_pushes_in_their_own_order() {
        let mut out = Outbox::new(5);
        out.enqueue(msg(1)).unwrap();
        out.enqueue(msg(2)).unwrap();
        out.enqueue_urgent(msg(10)).unwrap();
        out.enqueue(msg(3)).unwrap();
        out.enqueue_urgent(msg(11)).unwrap();
        assert_eq!(out.len(), 5);
        assert_eq!(out.enqueue_urgent(msg(12)), Err(Overflow), "acks count too");
        out.ping(Bytes::new());
        let batch = out.take().unwrap();
        assert_eq!(
            batch.frames,
            VecDeque::from([ws::pong(&[]), msg(10), msg(11), msg(1), msg(2), msg(3)])
        );
        assert_eq!(batch.count, 5);
        out.written();
        assert!(out.idle());
    }

    #[test]
    fn closing_drops_pongs_and_a_slow_consumers_queue() {
        let mut out = Outbox::new(4);
        out.enqueue(msg(1)).unwrap();
        out.ping(Bytes::new());
        out.close(false);
        out.ping(Bytes::new());
        out.enqueue(msg(2)).unwrap();
        let batch = out.take().unwrap();
        assert_eq!(
            batch.frames,
            [msg(1)],
            "queued before the close, no pong, nothing after"
        );
        out.written();
        assert!(out.idle());
        let mut slow = Outbox::new(4);
        slow.enqueue(msg(1)).unwrap();
        slow.close(true);
        assert!(slow.idle(), "nothing left to write before the close frame");
    }

    #[tokio::test]
    async fn batches_reach_the_client_whole_and_in_order_through_a_fake_transport() {
        use tokio::io::AsyncReadExt;
        // A small duplex pipe stands in for the socket (partial writes); the test reads the
        // client's end.
        let (server, mut client) = tokio::io::duplex(16);
        let (_reader, mut sink) = transport::split(Box::new(server), &[], 1024);
        let mut out = Outbox::new(100);
        let mut expected = ws::pong(b"p").to_vec();
        for i in 0..50u8 {
            let m = ws::binary(&[i; 10]);
            expected.extend_from_slice(&m);
            out.enqueue(m).unwrap();
        }
        out.ping(Bytes::from_static(b"p"));
        let mut batch = out.take().unwrap();
        let write = async {
            sink.write_all(&mut batch.frames).await.unwrap();
            sink.close(ws::close(1000, "bye")).await.unwrap();
        };
        let mut got = Vec::new();
        let ((), read) = tokio::join!(write, client.read_to_end(&mut got));
        read.unwrap();
        out.written();
        assert_eq!(&got[..expected.len()], &expected[..]);
        assert!(out.idle());
    }
}
