//! Byte streams multiplexed over one message connection, with per-stream credit: the
//! machinery both ends of a relay connection share (`messages::relay`, ADR 0015).
//!
//! A [`Mux`] does no IO of its own. Its owner feeds it every frame that arrives
//! ([`Mux::on_frame`]) and writes every frame it produces (the receiver [`Mux::new`]
//! returns) to the connection; each stream appears to local code as an ordinary
//! `AsyncRead + AsyncWrite` ([`DuplexStream`]). Two tasks per stream move bytes: one reads
//! the local end and sends `Data` within the credit the peer granted, one writes what the
//! peer sent to the local end and grants it back once written. So a stream whose local
//! reader stalls stops only itself: the connection's read loop never waits on a stream,
//! and a peer that sends beyond its credit gets that stream reset.
//!
//! Either end's EOF or error ends the whole stream (`Close`), as in TCP tunnels (no
//! half-close); when the connection ends, [`Mux::close_all`] ends every stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use messages::relay::{Frame, MAX_CHUNK, RelayFrameError, WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, mpsc, watch};

/// Capacity of each local duplex pipe, bytes.
const PIPE: usize = 64 * 1024;

/// Why a frame broke the connection (the owner should close it).
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The frame did not decode.
    #[error(transparent)]
    Frame(#[from] RelayFrameError),
    /// This end does not accept streams, or the id is already open.
    #[error("unexpected open of stream {0}")]
    UnexpectedOpen(u32),
    /// The connection is gone.
    #[error("the connection is closed")]
    Closed,
    /// No stream id left.
    #[error("too many streams")]
    TooMany,
}

/// One end of a multiplexed connection.
#[derive(Debug, Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    out: mpsc::UnboundedSender<Vec<u8>>,
    streams: Mutex<HashMap<u32, Entry>>,
    next: AtomicU32,
    accepts: bool,
    max_streams: usize,
    closed: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    /// Bytes from the peer, to be written locally.
    down: mpsc::UnboundedSender<Vec<u8>>,
    /// What this end may still send.
    credit: Arc<Semaphore>,
    /// Bytes the peer sent that were not granted back yet.
    unacked: Arc<AtomicU64>,
    /// Ends the reading task.
    stop: watch::Sender<bool>,
}

impl Mux {
    /// A mux and the receiver of the frames it wants written. `accepts`: whether the peer
    /// may open streams (the gateway's end) or only this end may (the relay's).
    pub fn new(accepts: bool, max_streams: usize) -> (Mux, mpsc::UnboundedReceiver<Vec<u8>>) {
        let (out, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            out,
            streams: Mutex::new(HashMap::new()),
            next: AtomicU32::new(1),
            accepts,
            max_streams,
            closed: AtomicBool::new(false),
        });
        (Mux { inner }, rx)
    }

    /// Open streams.
    pub fn streams(&self) -> usize {
        self.inner.streams.lock().map_or(0, |s| s.len())
    }

    /// Opens a stream to the peer; the returned end carries its bytes.
    pub fn open(&self) -> Result<DuplexStream, MuxError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(MuxError::Closed);
        }
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        if id == 0 || self.streams() >= self.inner.max_streams {
            return Err(MuxError::TooMany);
        }
        self.send(Frame::Open { stream: id });
        Ok(self.start(id))
    }

    /// Handles one frame from the peer. Returns a stream the peer opened, if this frame
    /// opened one; an error means the connection can no longer be trusted.
    pub fn on_frame(&self, bytes: &[u8]) -> Result<Option<(u32, DuplexStream)>, MuxError> {
        match Frame::decode(bytes)? {
            Frame::Open { stream } => {
                if !self.inner.accepts || self.has(stream) {
                    return Err(MuxError::UnexpectedOpen(stream));
                }
                if self.streams() >= self.inner.max_streams {
                    self.send(Frame::Close {
                        stream,
                        reason: "too_many",
                    });
                    return Ok(None);
                }
                Ok(Some((stream, self.start(stream))))
            }
            Frame::Data { stream, data } => {
                let over = {
                    let Ok(streams) = self.inner.streams.lock() else {
                        return Err(MuxError::Closed);
                    };
                    let Some(entry) = streams.get(&stream) else {
                        // Closed here while the peer was still sending: nothing to do.
                        return Ok(None);
                    };
                    let len = data.len() as u64;
                    let unacked = entry.unacked.fetch_add(len, Ordering::Relaxed) + len;
                    if unacked > u64::from(WINDOW) {
                        true
                    } else {
                        let _ = entry.down.send(data.to_vec());
                        false
                    }
                };
                if over {
                    tracing::warn!(stream, "Peer sent beyond its credit; resetting the stream.");
                    self.inner.finish(stream, Some("credit"));
                }
                Ok(None)
            }
            Frame::Window { stream, grant } => {
                if let Ok(streams) = self.inner.streams.lock()
                    && let Some(entry) = streams.get(&stream)
                {
                    let room =
                        Semaphore::MAX_PERMITS.saturating_sub(entry.credit.available_permits());
                    entry.credit.add_permits((grant as usize).min(room));
                }
                Ok(None)
            }
            Frame::Close { stream, .. } => {
                self.inner.finish(stream, None);
                Ok(None)
            }
        }
    }

    /// Ends every stream without telling the peer (the connection is gone).
    pub fn close_all(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        let drained: Vec<Entry> = match self.inner.streams.lock() {
            Ok(mut streams) => streams.drain().map(|(_, e)| e).collect(),
            Err(_) => vec![],
        };
        for entry in drained {
            let _ = entry.stop.send(true);
        }
    }

    fn has(&self, stream: u32) -> bool {
        self.inner
            .streams
            .lock()
            .is_ok_and(|s| s.contains_key(&stream))
    }

    fn send(&self, frame: Frame<'_>) {
        let _ = self.inner.out.send(frame.encode());
    }

    /// Registers `id` and starts its two pumps; returns the local end.
    fn start(&self, id: u32) -> DuplexStream {
        let (local, pumped) = tokio::io::duplex(PIPE);
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(WINDOW as usize));
        let unacked = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = watch::channel(false);
        if let Ok(mut streams) = self.inner.streams.lock() {
            streams.insert(
                id,
                Entry {
                    down: down_tx,
                    credit: Arc::clone(&credit),
                    unacked: Arc::clone(&unacked),
                    stop,
                },
            );
        }
        let (read, write) = tokio::io::split(pumped);
        tokio::spawn(uplink(Arc::clone(&self.inner), id, read, credit, stop_rx));
        tokio::spawn(downlink(
            Arc::clone(&self.inner),
            id,
            write,
            down_rx,
            unacked,
        ));
        local
    }
}

impl Inner {
    /// Forgets `id` and stops its pumps; tells the peer when `reason` is given.
    fn finish(&self, id: u32, reason: Option<&str>) {
        let entry = self.streams.lock().ok().and_then(|mut s| s.remove(&id));
        if let Some(entry) = entry {
            let _ = entry.stop.send(true);
            if let Some(reason) = reason {
                let _ = self.out.send(Frame::Close { stream: id, reason }.encode());
            }
        }
    }
}

/// Local bytes -> `Data` frames, within credit.
async fn uplink(
    inner: Arc<Inner>,
    id: u32,
    mut read: ReadHalf<DuplexStream>,
    credit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    let reason = loop {
        let n = tokio::select! {
            r = read.read(&mut buf) => match r {
                Ok(0) => break "eof",
                Ok(n) => n,
                Err(_) => break "error",
            },
            _ = stop.changed() => return,
        };
        let want = u32::try_from(n).unwrap_or(u32::MAX);
        tokio::select! {
            permit = credit.acquire_many(want) => match permit {
                Ok(p) => p.forget(),
                Err(_) => return,
            },
            _ = stop.changed() => return,
        }
        let frame = Frame::Data {
            stream: id,
            data: &buf[..n],
        };
        if inner.out.send(frame.encode()).is_err() {
            return;
        }
    };
    inner.finish(id, Some(reason));
}

/// The peer's `Data` -> local writes, granting credit back as it is written.
async fn downlink(
    inner: Arc<Inner>,
    id: u32,
    mut write: WriteHalf<DuplexStream>,
    mut down: mpsc::UnboundedReceiver<Vec<u8>>,
    unacked: Arc<AtomicU64>,
) {
    let mut delivered: u32 = 0;
    while let Some(chunk) = down.recv().await {
        if write.write_all(&chunk).await.is_err() {
            inner.finish(id, Some("error"));
            return;
        }
        delivered = delivered.saturating_add(u32::try_from(chunk.len()).unwrap_or(u32::MAX));
        if delivered >= WINDOW / 2 || down.is_empty() && delivered >= WINDOW / 8 {
            unacked.fetch_sub(u64::from(delivered), Ordering::Relaxed);
            let grant = Frame::Window {
                stream: id,
                grant: delivered,
            };
            if inner.out.send(grant.encode()).is_err() {
                return;
            }
            delivered = 0;
        }
    }
    let _ = write.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Two muxes wired back to back through their frame channels.
    fn pair() -> (Mux, Mux, mpsc::UnboundedReceiver<(u32, DuplexStream)>) {
        let (client, mut to_server) = Mux::new(false, 16);
        let (server, mut to_client) = Mux::new(true, 16);
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let s = server.clone();
        tokio::spawn(async move {
            while let Some(frame) = to_server.recv().await {
                if let Ok(Some(stream)) = s.on_frame(&frame) {
                    let _ = accepted_tx.send(stream);
                }
            }
        });
        let c = client.clone();
        tokio::spawn(async move {
            while let Some(frame) = to_client.recv().await {
                let _ = c.on_frame(&frame);
            }
        });
        (client, server, accepted)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_beyond_the_window_and_eof_closes_the_peer() {
        let (client, server, mut accepted) = pair();
        let mut a = client.open().unwrap();
        let (_, mut b) = accepted.recv().await.unwrap();
        // More than a window each way: credit must come back for this to finish.
        let big: Vec<u8> = (0..(3 * WINDOW as usize)).map(|i| i as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&big).await.unwrap();
            a
        });
        let mut got = vec![0u8; expect.len()];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expect);
        b.write_all(b"pong").await.unwrap();
        let mut a = writer.await.unwrap();
        let mut four = [0u8; 4];
        a.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");
        drop(a);
        let mut rest = vec![];
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!((client.streams(), server.streams()), (0, 0));
    }

    #[tokio::test]
    async fn a_stalled_stream_does_not_stop_another() {
        let (client, _server, mut accepted) = pair();
        let mut slow = client.open().unwrap();
        let (_, _slow_peer) = accepted.recv().await.unwrap();
        // Nobody reads the slow stream's peer: its sender runs out of credit and waits.
        let stuck = tokio::spawn(async move {
            let _ = slow.write_all(&vec![7u8; 4 * WINDOW as usize]).await;
        });
        let mut fast = client.open().unwrap();
        let (_, mut fast_peer) = accepted.recv().await.unwrap();
        fast.write_all(b"still moving").await.unwrap();
        let mut got = [0u8; 12];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            fast_peer.read_exact(&mut got),
        )
        .await
        .expect("the second stream was starved")
        .unwrap();
        assert_eq!(&got, b"still moving");
        stuck.abort();
    }

    #[tokio::test]
    async fn data_beyond_credit_resets_the_stream_and_bad_frames_are_errors() {
        let (server, mut out) = Mux::new(true, 1);
        let (_, mut local) = server
            .on_frame(&Frame::Open { stream: 5 }.encode())
            .unwrap()
            .unwrap();
        // A second open over the cap is refused with a close, not an error.
        assert!(
            server
                .on_frame(&Frame::Open { stream: 6 }.encode())
                .unwrap()
                .is_none()
        );
        assert_eq!(
            Frame::decode(&out.recv().await.unwrap()).unwrap(),
            Frame::Close {
                stream: 6,
                reason: "too_many"
            }
        );
        let chunk = vec![1u8; MAX_CHUNK];
        for _ in 0..(WINDOW as usize / MAX_CHUNK + 1) {
            server
                .on_frame(
                    &Frame::Data {
                        stream: 5,
                        data: &chunk,
                    }
                    .encode(),
                )
                .unwrap();
        }
        assert_eq!(server.streams(), 0, "over-credit stream reset");
        let mut sink = vec![];
        let _ = local.read_to_end(&mut sink).await;
        assert!(sink.len() <= WINDOW as usize);
        assert!(server.on_frame(&[0xff, 0, 0, 0, 1]).is_err());
        assert!(server.on_frame(&Frame::Open { stream: 5 }.encode()).is_ok());
        let (client, _) = Mux::new(false, 4);
        assert!(matches!(
            client.on_frame(&Frame::Open { stream: 1 }.encode()),
            Err(MuxError::UnexpectedOpen(1))
        ));
    }
}
