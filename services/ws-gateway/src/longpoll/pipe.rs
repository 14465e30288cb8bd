//! The byte pipe a long-poll session's connection actor talks WebSocket over.
//!
//! The actor (`session.rs`) is the same for every transport: it reads masked client
//! WebSocket frames and writes unmasked server frames. A [`Pipe`] gives it that stream
//! while the client speaks HTTP: a POST's frames are appended to the read side as masked
//! binary messages (an all-zero mask, so no byte changes), and the messages the actor
//! writes are kept, whole, until a poll takes them. Every rule of the actor (heartbeat,
//! rate limit, queue limit, slow consumer, close codes) therefore applies unchanged.
//!
//! Backpressure is what makes a missing poll a slow consumer: the pipe accepts one writer
//! batch while no poll waits; the next write stays pending until a poll takes what is
//! held, so the actor's write timeout and queue limit close a client whose poll does not
//! come back. A close frame is always accepted, so the close code reaches the next poll.
//!
//! The upgrade: [`PipeShared::take_over`] puts the client's new WebSocket behind the pipe.
//! Frames no poll has taken are written to the socket first, the read side reads what
//! POSTs left and then the socket, and from then on the pipe only delegates: no copy, no
//! task, no buffer of its own.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::transport::Transport;

/// A socket that may move between threads: the pipe is shared with HTTP handlers and bus
/// tasks, so what it holds must be `Send`.
pub(crate) type SendTransport = Box<dyn Transport + Send>;

/// Why a request cannot be applied to the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PipeError {
    /// The session moved to a WebSocket.
    #[error("the session was upgraded to WebSocket")]
    Upgraded,
    /// The session ended; its close code and reason.
    #[error("the session is closed ({0})")]
    Closed(u16, String),
    /// Frames from earlier POSTs still wait for the session to read them.
    #[error("too many frames waiting to be read; retry")]
    Busy,
}

/// What a poll returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PollOutcome {
    /// Protocol frames (possibly none: the wait ended, or a newer poll replaced this one).
    Frames(Vec<Bytes>),
    /// The session moved to a WebSocket: stop polling.
    Upgraded,
    /// The session ended with this close code and reason.
    Closed(u16, String),
}

/// The client's WebSocket after an upgrade.
struct Direct {
    io: SendTransport,
    /// Bytes the client sent right after its handshake, read before the socket.
    early: Bytes,
    /// Server messages no poll had taken, written before anything new.
    carry: VecDeque<Bytes>,
}

#[derive(Default)]
struct State {
    direct: Option<Direct>,
    /// Client -> gateway: masked WebSocket messages the actor has not read.
    inbound: BytesMut,
    /// The client ended the session: the read side ends after `inbound`.
    eof: bool,
    read_waker: Option<Waker>,
    /// Gateway -> client: complete server messages waiting for a poll.
    outbound: VecDeque<Bytes>,
    /// Bytes of a server message not complete yet.
    partial: BytesMut,
    write_waker: Option<Waker>,
    /// Numbers polls: a newer poll releases an older one.
    poll_gen: u64,
    /// A poll is waiting (writes are accepted for it).
    waiting: bool,
    /// The close frame the actor wrote (or 1006 when it went away without one).
    closed: Option<(u16, String)>,
    /// When the actor's side ended; the session is forgotten a while later.
    ended_at: Option<Instant>,
}

/// The state a session's HTTP requests and its actor share.
#[derive(Default)]
pub(crate) struct PipeShared {
    state: Mutex<State>,
    /// Wakes waiting polls.
    notify: Notify,
}

impl std::fmt::Debug for PipeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeShared").finish_non_exhaustive()
    }
}

/// Clears `waiting` when the poll that set it ends, however it ends.
struct WaitGuard<'a> {
    shared: &'a PipeShared,
    generation: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.poll_gen == self.generation {
            st.waiting = false;
        }
    }
}

/// The actor's end of the pipe.
#[derive(Debug)]
pub(crate) struct Pipe(pub Arc<PipeShared>);

const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const FIN: u8 = 0x80;
const MASKED: u8 = 0x80;

/// Appends a masked client message (all-zero mask: the payload is unchanged).
fn put_masked(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.put_u8(FIN | opcode);
    let len = payload.len();
    if len < 126 {
        out.put_u8(MASKED | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.put_u8(MASKED | 126);
        out.put_u16(len16);
    } else {
        out.put_u8(MASKED | 127);
        out.put_u64(len as u64);
    }
    out.put_slice(&[0; 4]);
    out.put_slice(payload);
}

/// Header length and payload length of the unmasked server message at the front of
/// `buf`, when its header is complete.
fn server_header(buf: &[u8]) -> Option<(usize, usize)> {
    let b1 = *buf.get(1)?;
    match b1 & 0x7F {
        126 => {
            let b = buf.get(2..4)?;
            Some((4, usize::from(u16::from_be_bytes([b[0], b[1]]))))
        }
        127 => {
            let b = <[u8; 8]>::try_from(buf.get(2..10)?).ok()?;
            Some((
                10,
                usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
            ))
        }
        n => Some((2, usize::from(n))),
    }
}

/// The payload of a complete server message (the protocol frame of a binary message).
pub(crate) fn payload_of(message: &Bytes) -> Bytes {
    match server_header(message) {
        Some((header, _)) if header <= message.len() => message.slice(header..),
        _ => Bytes::new(),
    }
}

impl State {
    /// Moves complete server messages out of `partial`.
    fn extract(&mut self) {
        while let Some((header, len)) = server_header(&self.partial) {
            let Some(total) = header.checked_add(len) else {
                return;
            };
            if self.partial.len() < total {
                return;
            }
            let message = self.partial.split_to(total).freeze();
            match message[0] & 0x0F {
                OP_BINARY => self.outbound.push_back(message),
                OP_CLOSE => {
                    let payload = &message[header..];
                    let (code, reason) = match payload {
                        [hi, lo, reason @ ..] => (
                            u16::from_be_bytes([*hi, *lo]),
                            String::from_utf8_lossy(reason).into_owned(),
                        ),
                        _ => (1000, String::new()),
                    };
                    self.closed.get_or_insert((code, reason));
                }
                // Pongs: a long-poll client cannot ping.
                _ => {}
            }
        }
        if self.partial.is_empty() {
            self.partial = BytesMut::new();
        }
    }

    /// The actor is gone: whatever close it did not report is 1006.
    fn end(&mut self) {
        self.closed
            .get_or_insert_with(|| (1006, "connection ended".to_owned()));
        self.ended_at.get_or_insert_with(Instant::now);
    }

    /// Everything waiting for a poll; releases a pending write.
    fn take(&mut self) -> Vec<Bytes> {
        self.waiting = false;
        if let Some(waker) = self.write_waker.take() {
            waker.wake();
        }
        std::mem::take(&mut self.outbound)
            .iter()
            .map(payload_of)
            .collect()
    }
}

impl PipeShared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock is a bug elsewhere; the state is still coherent
        // enough to close the session.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refusal(state: &State) -> Option<PipeError> {
        if state.direct.is_some() {
            return Some(PipeError::Upgraded);
        }
        if let Some((code, reason)) = &state.closed {
            return Some(PipeError::Closed(*code, reason.clone()));
        }
        if state.eof {
            return Some(PipeError::Closed(1000, "closed by the client".into()));
        }
        None
    }

    /// Hands the frames of a POST to the actor, in order. At most `max_waiting` bytes of
    /// earlier POSTs may still be unread.
    pub(crate) fn send(&self, frames: &[&[u8]], max_waiting: usize) -> Result<(), PipeError> {
        let mut st = self.lock();
        if let Some(refusal) = Self::refusal(&st) {
            return Err(refusal);
        }
        if st.inbound.len() > max_waiting {
            return Err(PipeError::Busy);
        }
        for frame in frames {
            put_masked(&mut st.inbound, OP_BINARY, frame);
        }
        if let Some(waker) = st.read_waker.take() {
            waker.wake();
        }
        Ok(())
    }

    /// The client ends the session: a close frame (1000), then the end of the stream.
    pub(crate) fn close_by_client(&self) {
        let mut st = self.lock();
        if st.direct.is_some() || st.eof {
            return;
        }
        put_masked(&mut st.inbound, OP_CLOSE, &1000u16.to_be_bytes());
        st.eof = true;
        if let Some(waker) = st.read_waker.take() {
            waker.wake();
        }
    }

    /// Waits up to `wait` for frames. A newer poll releases this one with no frames.
    pub(crate) async fn poll(&self, wait: Duration) -> PollOutcome {
        let deadline = tokio::time::Instant::now() + wait;
        let generation = {
            let mut st = self.lock();
            st.poll_gen = st.poll_gen.wrapping_add(1);
            st.poll_gen
        };
        // A newer poll is told apart by the generation; an older one waiting is released.
        self.notify.notify_waiters();
        // A poll whose client went away is dropped mid-wait: writes must stop being
        // accepted for it, or frames would pile up here past the actor's queue limit.
        let _waiting = WaitGuard {
            shared: self,
            generation,
        };
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.poll_gen != generation {
                    return PollOutcome::Frames(Vec::new());
                }
                if st.direct.is_some() {
                    return PollOutcome::Upgraded;
                }
                if !st.outbound.is_empty() {
                    return PollOutcome::Frames(st.take());
                }
                if let Some((code, reason)) = &st.closed {
                    return PollOutcome::Closed(*code, reason.clone());
                }
                st.waiting = true;
                // A writer held back before this poll came may go on now.
                if let Some(waker) = st.write_waker.take() {
                    waker.wake();
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    let mut st = self.lock();
                    if st.poll_gen != generation {
                        return PollOutcome::Frames(Vec::new());
                    }
                    return PollOutcome::Frames(st.take());
                }
            }
        }
    }

    /// Whether a WebSocket may take the session over now.
    pub(crate) fn can_take_over(&self) -> Result<(), PipeError> {
        Self::refusal(&self.lock()).map_or(Ok(()), Err)
    }

    /// Puts the client's WebSocket behind the pipe (see the module documentation).
    pub(crate) fn take_over(&self, io: SendTransport, early: Bytes) -> Result<(), PipeError> {
        let mut st = self.lock();
        if let Some(refusal) = Self::refusal(&st) {
            return Err(refusal);
        }
        let mut carry = std::mem::take(&mut st.outbound);
        if !st.partial.is_empty() {
            let partial = std::mem::take(&mut st.partial).freeze();
            carry.push_back(partial);
        }
        st.direct = Some(Direct { io, early, carry });
        st.waiting = false;
        for waker in [st.read_waker.take(), st.write_waker.take()]
            .into_iter()
            .flatten()
        {
            waker.wake();
        }
        drop(st);
        self.notify.notify_waiters();
        Ok(())
    }

    /// Whether the session ended more than `linger` ago (its last poll has had time to
    /// learn the close code).
    pub(crate) fn expired(&self, linger: Duration, now: Instant) -> bool {
        let st = self.lock();
        st.ended_at
            .is_some_and(|at| now.saturating_duration_since(at) >= linger)
            || (st.direct.is_some() && st.ended_at.is_some())
    }

    /// The actor stopped with this close code: reported to polls unless a close frame
    /// already told the code.
    pub(crate) fn record_close(&self, code: u16, reason: &str) {
        let mut st = self.lock();
        if st.direct.is_some() {
            return;
        }
        st.closed.get_or_insert_with(|| (code, reason.to_owned()));
        drop(st);
        self.notify.notify_waiters();
    }
}

impl AsyncRead for Pipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.0.lock();
        if !st.inbound.is_empty() {
            let n = st.inbound.len().min(buf.remaining());
            buf.put_slice(&st.inbound[..n]);
            st.inbound.advance(n);
            if st.inbound.is_empty() {
                st.inbound = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(direct) = st.direct.as_mut() {
            if !direct.early.is_empty() {
                let n = direct.early.len().min(buf.remaining());
                buf.put_slice(&direct.early[..n]);
                direct.early.advance(n);
                return Poll::Ready(Ok(()));
            }
            return Pin::new(&mut direct.io).poll_read(cx, buf);
        }
        if st.eof {
            return Poll::Ready(Ok(()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let shared = Arc::clone(&self.0);
        let mut st = shared.lock();
        if let Some(direct) = st.direct.as_mut() {
            while let Some(front) = direct.carry.front_mut() {
                let n = match Pin::new(&mut direct.io).poll_write(cx, front) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                front.advance(n);
                if front.is_empty() {
                    direct.carry.pop_front();
                }
            }
            return Pin::new(&mut direct.io).poll_write_vectored(cx, bufs);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 || st.closed.is_some() {
            // Nothing can reach the client after its close frame; the bytes are dropped.
            return Poll::Ready(Ok(total));
        }
        let starts_close = st.partial.is_empty()
            && bufs
                .iter()
                .find(|b| !b.is_empty())
                .is_some_and(|b| b[0] & 0x0F == OP_CLOSE);
        if !st.outbound.is_empty() && !st.waiting && !starts_close {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        for b in bufs {
            st.partial.extend_from_slice(b);
        }
        st.extract();
        drop(st);
        shared.notify.notify_waiters();
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.0.lock();
        match st.direct.as_mut() {
            Some(direct) => Pin::new(&mut direct.io).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.0.lock();
        if let Some(direct) = st.direct.as_mut() {
            return Pin::new(&mut direct.io).poll_shutdown(cx);
        }
        // The close code comes with the close frame, or from the actor when it stops
        // (a writer cancelled while it waited for a poll writes no close frame).
        Poll::Ready(Ok(()))
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.0.lock().end();
        self.0.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn posted_frames_read_as_masked_messages_and_a_client_close_ends_the_stream() {
        let shared = Arc::new(PipeShared::default());
        let mut pipe = Pipe(Arc::clone(&shared));
        shared.send(&[b"abc", &[7u8; 200]], 1 << 20).unwrap();
        shared.close_by_client();
        let mut got = Vec::new();
        pipe.read_to_end(&mut got).await.unwrap();
        let mut decoder = crate::ws::Decoder::new(1000);
        let mut out = std::collections::VecDeque::new();
        decoder.feed(&got, &mut out).unwrap();
        assert_eq!(
            Vec::from(out),
            vec![
                crate::ws::Message::Binary(Bytes::from_static(b"abc")),
                crate::ws::Message::Binary(Bytes::from(vec![7u8; 200])),
                crate::ws::Message::Close(Some(1000)),
            ]
        );
        assert_eq!(
            shared.send(&[b"x"], 1 << 20),
            Err(PipeError::Closed(1000, "closed by the client".into()))
        );
    }

    #[tokio::test]
    async fn one_batch_is_held_without_a_poll_and_the_next_write_waits_for_one() {
        let shared = Arc::new(PipeShared::default());
        let mut pipe = Pipe(Arc::clone(&shared));
        pipe.write_all(&crate::ws::binary(b"one")).await.unwrap();
        // The second write cannot complete until a poll takes the first.
        let second = crate::ws::binary(&[2u8; 300]);
        let mut write = Box::pin(pipe.write_all(&second));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut write)
                .await
                .is_err()
        );
        assert_eq!(
            shared.poll(Duration::from_secs(1)).await,
            PollOutcome::Frames(vec![Bytes::from_static(b"one")])
        );
        write.await.unwrap();
        assert_eq!(
            shared.poll(Duration::from_secs(1)).await,
            PollOutcome::Frames(vec![Bytes::from(vec![2u8; 300])])
        );
        // A close frame is accepted even while a batch waits, and reported after it.
        pipe.write_all(&crate::ws::binary(b"last")).await.unwrap();
        pipe.write_all(&crate::ws::close(4002, "slow consumer"))
            .await
            .unwrap();
        assert_eq!(
            shared.poll(Duration::from_secs(1)).await,
            PollOutcome::Frames(vec![Bytes::from_static(b"last")])
        );
        assert_eq!(
            shared.poll(Duration::from_secs(1)).await,
            PollOutcome::Closed(4002, "slow consumer".into())
        );
    }

    #[tokio::test]
    async fn an_empty_wait_ends_empty_and_a_newer_poll_releases_an_older_one() {
        let shared = Arc::new(PipeShared::default());
        assert_eq!(
            shared.poll(Duration::from_millis(20)).await,
            PollOutcome::Frames(vec![])
        );
        let older = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { shared.poll(Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let newer = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { shared.poll(Duration::from_secs(30)).await })
        };
        assert_eq!(older.await.unwrap(), PollOutcome::Frames(vec![]));
        let mut pipe = Pipe(Arc::clone(&shared));
        pipe.write_all(&crate::ws::binary(b"n")).await.unwrap();
        assert_eq!(
            newer.await.unwrap(),
            PollOutcome::Frames(vec![Bytes::from_static(b"n")])
        );
    }

    #[tokio::test]
    async fn a_poll_dropped_mid_wait_no_longer_lets_writes_through() {
        let shared = Arc::new(PipeShared::default());
        let mut pipe = Pipe(Arc::clone(&shared));
        // The client hangs up while its poll waits (the HTTP layer drops the future).
        let _ = tokio::time::timeout(
            Duration::from_millis(20),
            shared.poll(Duration::from_secs(30)),
        )
        .await;
        pipe.write_all(&crate::ws::binary(b"one")).await.unwrap();
        let second = crate::ws::binary(b"two");
        let mut write = Box::pin(pipe.write_all(&second));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut write)
                .await
                .is_err(),
            "held back until a poll comes"
        );
    }

    #[tokio::test]
    async fn a_take_over_writes_untaken_frames_first_and_releases_the_poll() {
        let shared = Arc::new(PipeShared::default());
        let mut pipe = Pipe(Arc::clone(&shared));
        shared.send(&[b"posted"], 1 << 20).unwrap();
        pipe.write_all(&crate::ws::binary(b"held")).await.unwrap();
        let (server, mut client) = tokio::io::duplex(1024);
        shared
            .take_over(Box::new(server), Bytes::from_static(b"early"))
            .unwrap();
        assert_eq!(
            shared.poll(Duration::from_secs(1)).await,
            PollOutcome::Upgraded
        );
        assert_eq!(shared.send(&[b"x"], 1 << 20), Err(PipeError::Upgraded));
        pipe.write_all(&crate::ws::binary(b"new")).await.unwrap();
        let mut got = vec![0u8; 11];
        client.read_exact(&mut got).await.unwrap();
        let mut expected = crate::ws::binary(b"held").to_vec();
        expected.extend_from_slice(&crate::ws::binary(b"new"));
        assert_eq!(got, expected);
        // Reads: what POSTs left, then the early bytes, then the socket.
        client.write_all(b"sock").await.unwrap();
        let mut read = [0u8; 8 + 4 + 5 + 4];
        pipe.read_exact(&mut read[..12]).await.unwrap();
        pipe.read_exact(&mut read[12..17]).await.unwrap();
        pipe.read_exact(&mut read[17..]).await.unwrap();
        assert_eq!(&read[12..17], b"early");
        assert_eq!(&read[17..], b"sock");
    }
}
