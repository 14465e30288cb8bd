//! Live command output: cuts what a command writes into sequence-numbered chunks and hands
//! them to the connection loop as it is produced, while keeping the tail the durable result
//! carries.
//!
//! The rules, and why:
//! - A chunk is cut when [`CHUNK_BYTES`] have piled up, or when [`FLUSH_EVERY`] has passed
//!   since the previous cut: the first bytes of a quiet command leave at once (an operator
//!   watching `--follow` sees the first line without delay), a chatty one is coalesced into
//!   at most ten chunks a second per stream plus full-size ones.
//! - Nothing here ever blocks the command: chunks go to an unbounded channel whose length
//!   is capped by a shared counter ([`OUTPUT_QUEUE`]). When the queue is full (the link is
//!   slow or down) a chunk is dropped but still takes its sequence number, so the receiver
//!   sees the gap and, from `offset`, its size. Slowing the command down to the speed of
//!   the operator's view would change what the command does; the durable result never
//!   depends on these chunks.
//! - Each task streams at most [`MAX_STREAMED_BYTES`]; after that only the result's tails
//!   carry its output. A command printing gigabytes costs the link a bounded amount.
//! - A cut never splits a UTF-8 character: an incomplete one is carried into the next chunk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use messages::fleet::{Stream, TaskOutput};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::executor::ExecEvent;

/// Largest chunk.
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Longest time bytes wait for a cut once the previous chunk left.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Chunks waiting for the connection loop, across all tasks, before new ones are dropped
/// (at most 1 MiB of chunk data held).
pub const OUTPUT_QUEUE: usize = 64;
/// Bytes one task attempt streams at most (both streams together).
pub const MAX_STREAMED_BYTES: u64 = 4 * 1024 * 1024;
/// Output frames the agent sends per second, across all tasks: well under the gateway's
/// per-connection frame rate (50/s by default), so output never gets the agent's own
/// connection closed for flooding, and heartbeats and results always have room.
pub const FRAMES_PER_SEC: f64 = 20.0;
/// Output frames sent back to back after a quiet period.
pub const FRAME_BURST: f64 = 40.0;

/// Where the chunks of all tasks go: the executor's event channel, with the cap on how
/// many may wait in it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OutputQueue {
    events: mpsc::UnboundedSender<ExecEvent>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

impl OutputQueue {
    /// A queue feeding `events`.
    pub fn new(events: mpsc::UnboundedSender<ExecEvent>) -> Self {
        OutputQueue {
            events,
            queued: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The connection loop took a chunk off the channel.
    pub fn taken(&self) {
        // Saturating: a chunk sent before a counter reset cannot wrap it.
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Chunks cut but never sent since the start (queue full, or over the frame pace).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The connection loop took a chunk but did not send it (over the frame pace).
    pub fn not_sent(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn offer(&self, chunk: TaskOutput) {
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < OUTPUT_QUEUE).then_some(n + 1)
            })
            .is_ok();
        if !admitted || self.events.send(ExecEvent::Output(chunk)).is_err() {
            if admitted {
                self.taken();
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A stream of one attempt of `task_id`: both of its streams share the sequence and
    /// the byte budget.
    pub fn attempt(&self, task_id: u64, attempt: u32) -> AttemptOutput {
        AttemptOutput {
            queue: self.clone(),
            task_id,
            attempt,
            seq: Arc::new(AtomicU64::new(0)),
            budget: Arc::new(AtomicU64::new(MAX_STREAMED_BYTES)),
        }
    }
}

/// The chunking state one task attempt shares between its stdout and stderr readers.
#[derive(Debug, Clone)]
pub struct AttemptOutput {
    queue: OutputQueue,
    task_id: u64,
    attempt: u32,
    seq: Arc<AtomicU64>,
    budget: Arc<AtomicU64>,
}

impl AttemptOutput {
    /// Chunks cut so far (sent or not); the next chunk's number.
    pub fn chunks(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Cuts `data` (which starts at `offset` in `stream`) into a chunk and offers it.
    fn emit(&self, stream: Stream, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        let within_budget = self
            .budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(len)
            })
            .is_ok();
        if !within_budget {
            // Past the budget nothing is cut any more, so no sequence numbers are used up.
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::AcqRel);
        self.queue.offer(TaskOutput {
            task_id: self.task_id,
            attempt: self.attempt,
            seq,
            stream,
            offset,
            data: String::from_utf8_lossy(data).into_owned(),
        });
    }
}

/// A token bucket for output frames ([`FRAMES_PER_SEC`], bursts of [`FRAME_BURST`]).
#[derive(Debug)]
pub struct Pace {
    tokens: f64,
    at: Instant,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            tokens: FRAME_BURST,
            at: Instant::now(),
        }
    }
}

impl Pace {
    /// Whether one more frame may go now (and takes its token if so).
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * FRAMES_PER_SEC;
        self.tokens = (self.tokens + refill).min(FRAME_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reads `reader` to its end, streaming it through `live` (if any) and returning the last
/// `tail_bytes` bytes.
pub async fn read_stream(
    mut reader: impl AsyncRead + Unpin,
    stream: Stream,
    live: Option<AttemptOutput>,
    tail_bytes: usize,
) -> Vec<u8> {
    let mut tail = Vec::with_capacity(tail_bytes.min(4096));
    let mut buf = vec![0u8; 4096];
    let mut cutter = live.map(|live| Cutter {
        live,
        stream,
        pending: Vec::new(),
        offset: 0,
        last_cut: None,
    });
    loop {
        let deadline = cutter.as_ref().and_then(Cutter::deadline);
        let read = match deadline {
            // `read` is cancel safe: a timed-out read loses no bytes.
            Some(at) => match tokio::time::timeout_at(at, reader.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => {
                    if let Some(c) = cutter.as_mut() {
                        c.cut(false);
                    }
                    continue;
                }
            },
            None => reader.read(&mut buf).await,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        tail.extend_from_slice(data);
        if tail.len() > tail_bytes {
            let cut = tail.len() - tail_bytes;
            tail.drain(..cut);
        }
        if let Some(c) = cutter.as_mut() {
            c.pending.extend_from_slice(data);
            if c.pending.len() >= CHUNK_BYTES || c.due() {
                c.cut(false);
            }
        }
    }
    if let Some(c) = cutter.as_mut() {
        c.cut(true);
    }
    tail
}

/// One stream's bytes waiting for a cut.
struct Cutter {
    live: AttemptOutput,
    stream: Stream,
    pending: Vec<u8>,
    /// Bytes of the stream before `pending`.
    offset: u64,
    last_cut: Option<Instant>,
}

impl Cutter {
    /// When the pending bytes must leave, if any are waiting.
    fn deadline(&self) -> Option<Instant> {
        if self.pending.is_empty() {
            return None;
        }
        Some(
            self.last_cut
                .map_or_else(Instant::now, |at| at + FLUSH_EVERY),
        )
    }

    fn due(&self) -> bool {
        self.last_cut.is_none_or(|at| at.elapsed() >= FLUSH_EVERY)
    }

    /// Emits the pending bytes in chunks of at most [`CHUNK_BYTES`], ending on a character
    /// boundary unless `last` (the stream ended: whatever is left goes, repaired).
    fn cut(&mut self, last: bool) {
        while !self.pending.is_empty() {
            let mut end = self.pending.len().min(CHUNK_BYTES);
            if !last || end < self.pending.len() {
                end = char_boundary(&self.pending[..end]);
                if end == 0 {
                    if self.pending.len() < CHUNK_BYTES && !last {
                        // Only the start of a character so far: wait for the rest.
                        return;
                    }
                    // Not UTF-8 at all: cut where we are, the lossy decoding repairs it.
                    end = self.pending.len().min(CHUNK_BYTES);
                }
            }
            let rest = self.pending.split_off(end);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.live.emit(self.stream, self.offset, &chunk);
            self.offset += chunk.len() as u64;
            self.last_cut = Some(Instant::now());
            if !last && self.pending.len() < CHUNK_BYTES {
                // The remainder is an incomplete character or waits for the next cut.
                return;
            }
        }
    }
}

/// The longest prefix of `bytes` that does not end inside a UTF-8 character: everything
/// but an incomplete sequence at the very end (invalid bytes elsewhere stay, decoded
/// lossily).
fn char_boundary(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        // An invalid byte before the end: look again after it.
        Err(e) => {
            let skip = e.valid_up_to() + e.error_len().unwrap_or(1);
            skip + char_boundary(&bytes[skip..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (OutputQueue, mpsc::UnboundedReceiver<ExecEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (OutputQueue::new(tx), rx)
    }

    fn chunks(rx: &mut mpsc::UnboundedReceiver<ExecEvent>) -> Vec<TaskOutput> {
        let mut out = Vec::new();
        while let Ok(ExecEvent::Output(c)) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_allows_a_burst_then_the_sustained_rate() {
        let mut pace = Pace::default();
        let burst = (0..100).take_while(|_| pace.allow()).count();
        assert_eq!(burst, FRAME_BURST as usize);
        tokio::time::advance(Duration::from_secs(1)).await;
        let next = (0..100).take_while(|_| pace.allow()).count();
        assert_eq!(next, FRAMES_PER_SEC as usize);
    }

    #[test]
    fn boundaries_never_split_a_character() {
        let s = "aé€😀".as_bytes();
        assert_eq!(char_boundary(s), s.len());
        for cut in 0..s.len() {
            let b = char_boundary(&s[..cut]);
            assert!(std::str::from_utf8(&s[..b]).is_ok(), "cut {cut} -> {b}");
            assert!(cut - b < 4);
        }
        // An invalid byte in the middle does not stop the scan.
        assert_eq!(char_boundary(b"a\xffb"), 3);
        assert_eq!(char_boundary(b"a\xffb\xe2\x82"), 3);
    }

    #[tokio::test]
    async fn output_is_cut_in_sequence_with_offsets_and_the_tail_kept() {
        let (q, mut rx) = queue();
        let live = q.attempt(7, 2);
        let data = "é".repeat(20_000); // 40,000 bytes: three chunks, the cuts mid-stream.
        let tail = read_stream(data.as_bytes(), Stream::Stdout, Some(live), 100).await;
        assert_eq!(tail, &data.as_bytes()[data.len() - 100..]);
        let got = chunks(&mut rx);
        assert!(got.len() >= 3, "{}", got.len());
        let mut offset = 0;
        for (i, c) in got.iter().enumerate() {
            assert_eq!((c.task_id, c.attempt, c.seq), (7, 2, i as u64));
            assert_eq!(c.offset, offset);
            assert!(!c.data.contains('\u{fffd}'));
            assert!(c.data.len() <= CHUNK_BYTES);
            offset += c.data.len() as u64;
        }
        let joined: String = got.iter().map(|c| c.data.as_str()).collect();
        assert_eq!(joined, data);
    }

    #[tokio::test]
    async fn a_full_queue_drops_chunks_but_their_numbers_show_the_gap() {
        let (q, mut rx) = queue();
        let live = q.attempt(1, 1);
        let data = vec![b'x'; CHUNK_BYTES * (OUTPUT_QUEUE + 10)];
        read_stream(&data[..], Stream::Stdout, Some(live), 10).await;
        let got = chunks(&mut rx);
        let seqs: Vec<u64> = got.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (0..OUTPUT_QUEUE as u64).collect::<Vec<_>>());
        // The first read leaves at once (a quiet command's first line is not held back),
        // so there is one chunk more than full ones.
        assert_eq!(q.dropped(), 11);
        // Taking chunks off frees room: the next attempt's chunks flow again.
        for _ in 0..OUTPUT_QUEUE {
            q.taken();
        }
        let live = q.attempt(1, 2);
        read_stream(&b"more"[..], Stream::Stderr, Some(live), 10).await;
        let got = chunks(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].seq, got[0].data.as_str()), (0, "more"));
    }

    #[tokio::test]
    async fn a_task_streams_at_most_its_budget() {
        let (q, mut rx) = queue();
        let live = q.attempt(1, 1);
        let total = MAX_STREAMED_BYTES as usize + CHUNK_BYTES * 4;
        let reader = tokio::io::repeat(b'y').take(total as u64);
        // Drain concurrently so the queue never fills: only the budget stops chunks.
        let reading = tokio::spawn(read_stream(reader, Stream::Stdout, Some(live), 10));
        let mut streamed = 0u64;
        loop {
            match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
                Ok(Some(ExecEvent::Output(c))) => {
                    q.taken();
                    streamed += c.data.len() as u64;
                }
                _ if reading.is_finished() && rx.is_empty() => break,
                _ => {}
            }
        }
        assert_eq!(q.dropped(), 0);
        assert!(streamed <= MAX_STREAMED_BYTES, "{streamed}");
        assert!(
            streamed >= MAX_STREAMED_BYTES - CHUNK_BYTES as u64,
            "{streamed}"
        );
    }
}
