//! The upgraded socket of one connection, split in two: a [`Reader`] stream of WebSocket
//! messages for the connection actor, and a [`Sink`] its writer futures share.
//!
//! Reads go through a buffer on the stack of the task polling the reader, never one the
//! connection owns: an idle connection holds no read buffer, and bytes are kept only for
//! a frame that is still arriving (see [`crate::ws::Decoder`]). Writes hand the queued,
//! already encoded frames to the socket as they are, several per system call (vectored),
//! with no write buffer of the connection's own.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

use crate::ws::{Decoder, Message, WsError};

/// Bytes read per system call. Lives on the polling task's stack only while a read runs.
const READ_CHUNK: usize = 8 * 1024;
/// Most frames handed to one vectored write.
const MAX_IOV: usize = 64;

/// An upgraded connection: plain TCP or TLS.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> Transport for T {}

/// A boxed transport, so the connection actor is one type whatever the socket is.
pub(crate) type BoxTransport = Box<dyn Transport>;

/// Splits an upgraded socket. `early` holds bytes the client sent right after its
/// handshake (read by the HTTP layer along with it); they are decoded first.
pub(crate) fn split(io: BoxTransport, early: &[u8], max_message: usize) -> (Reader, Sink) {
    let (read, write) = tokio::io::split(io);
    let mut reader = Reader {
        io: read,
        decoder: Decoder::new(max_message),
        ready: VecDeque::new(),
        failed: None,
        done: false,
    };
    if !early.is_empty()
        && let Err(e) = reader.decoder.feed(early, &mut reader.ready)
    {
        reader.failed = Some(e);
    }
    let sink = Sink {
        io: write,
        torn: false,
    };
    (reader, sink)
}

/// The messages a client sends, in order; ends after the first error or at EOF.
pub(crate) struct Reader {
    io: ReadHalf<BoxTransport>,
    decoder: Decoder,
    /// Messages decoded from the last read and not yet taken.
    ready: VecDeque<Message>,
    /// An error found while decoding early bytes, reported after the messages before it.
    failed: Option<WsError>,
    done: bool,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("ready", &self.ready.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Stream for Reader {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = this.ready.pop_front() {
                if this.ready.is_empty() && this.ready.capacity() > 8 {
                    // A burst left a long queue behind; an idle connection keeps none.
                    this.ready = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(message)));
            }
            if let Some(e) = this.failed.take() {
                this.done = true;
                return Poll::Ready(Some(Err(e)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut this.io).poll_read(cx, &mut buf)) {
                this.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            let read = buf.filled();
            if read.is_empty() {
                this.done = true;
                if this.decoder.mid_message() {
                    let eof = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection ended in the middle of a message",
                    );
                    return Poll::Ready(Some(Err(eof.into())));
                }
                return Poll::Ready(None);
            }
            if let Err(e) = this.decoder.feed(read, &mut this.ready) {
                // Messages before the bad frame are still delivered, then the error.
                this.failed = Some(e);
            }
        }
    }
}

/// The write half. `torn` records that a write was abandoned part way (a timeout
/// cancelled it), after which the stream is no longer framed and nothing more may be
/// written but the end of the connection.
pub(crate) struct Sink {
    io: WriteHalf<BoxTransport>,
    torn: bool,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("torn", &self.torn)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Writes every frame in `frames`, front first, batching them into vectored writes.
    /// Frames are removed as they are written; a cancelled call leaves the sink torn.
    pub(crate) async fn write_all(&mut self, frames: &mut VecDeque<Bytes>) -> std::io::Result<()> {
        if self.torn {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "an earlier write was abandoned",
            ));
        }
        self.torn = true;
        while !frames.is_empty() {
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for (slot, frame) in slices.iter_mut().zip(frames.iter()) {
                    *slot = IoSlice::new(frame);
                    count += 1;
                }
                self.io.write_vectored(&slices[..count]).await?
            };
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            consume(frames, written);
        }
        self.io.flush().await?;
        self.torn = false;
        Ok(())
    }

    /// Sends `close` (unless the stream is torn) and shuts the write side down.
    pub(crate) async fn close(&mut self, close: Bytes) -> std::io::Result<()> {
        if !self.torn {
            let mut frames = VecDeque::from([close]);
            self.write_all(&mut frames).await?;
        }
        self.io.shutdown().await
    }
}

/// Drops `n` written bytes from the front of `frames`.
fn consume(frames: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = frames.front_mut() else {
            return;
        };
        if n < front.len() {
            front.advance(n);
            return;
        }
        n -= front.len();
        frames.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;

    #[test]
    fn consume_advances_across_frames() {
        let mut frames = VecDeque::from([
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ]);
        consume(&mut frames, 4);
        assert_eq!(
            frames,
            VecDeque::from([Bytes::from_static(b"e"), Bytes::from_static(b"fgh")])
        );
        consume(&mut frames, 4);
        assert!(frames.is_empty());
    }

    #[tokio::test]
    async fn frames_cross_a_small_pipe_whole_and_in_order() {
        // A pipe with a tiny buffer forces partial vectored writes and partial reads.
        let (server, mut client) = tokio::io::duplex(7);
        let (mut reader, mut sink) = split(Box::new(server), &[], 1 << 20);
        let frames: VecDeque<Bytes> = (0..50u8).map(|i| crate::ws::binary(&[i; 33])).collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let mut queue = frames.clone();
        let write = async {
            sink.write_all(&mut queue).await.unwrap();
            sink.close(crate::ws::close(1000, "bye")).await.unwrap();
        };
        let mut got = Vec::new();
        let ((), read) = tokio::join!(write, client.read_to_end(&mut got));
        read.unwrap();
        assert_eq!(&got[..expected.len()], &expected[..]);
        assert_eq!(&got[expected.len()..], &crate::ws::close(1000, "bye")[..]);
        // The client side hung up without sending anything: the stream just ends.
        drop(client);
        assert!(reader.next().await.is_none());
    }
}
