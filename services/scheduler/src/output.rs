//! Recent output of running commands, as the agents stream it (`agent.task.output`).
//!
//! Chunks are best effort on the wire (not outboxed), so they are kept in memory only and
//! bounded: per target the newest [`MAX_BYTES_PER_TARGET`] bytes, and at most
//! [`MAX_TARGETS`] targets (the oldest tasks are forgotten first). The final tails of
//! stdout and stderr are part of the durable result anyway. Every new chunk is also
//! broadcast to the followers of `GET /v1/tasks/{id}/output?follow=1` (see
//! [`crate::follow`]); a follower that falls behind by more than [`FOLLOW_BACKLOG`] chunks
//! is told so and reads the kept chunks again.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use messages::UserId;
use messages::fleet::TaskOutput;
use tokio::sync::broadcast;

use crate::store::TaskId;

/// Chunks a follower may lag behind before it must re-read the kept chunks.
pub(crate) const FOLLOW_BACKLOG: usize = 1024;

/// A chunk as broadcast to followers.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// The node that sent it.
    pub node: UserId,
    /// The chunk.
    pub chunk: TaskOutput,
}

/// Output bytes kept per (task, node).
pub(crate) const MAX_BYTES_PER_TARGET: usize = 64 * 1024;
/// Targets whose output is kept.
pub(crate) const MAX_TARGETS: usize = 4096;

#[derive(Debug, Default)]
struct Buffer {
    chunks: VecDeque<TaskOutput>,
    bytes: usize,
}

/// The in-memory output log.
#[derive(Debug)]
pub struct OutputLog {
    inner: Mutex<BTreeMap<(TaskId, UserId), Buffer>>,
    live: broadcast::Sender<Arc<Streamed>>,
}

impl Default for OutputLog {
    fn default() -> Self {
        OutputLog {
            inner: Mutex::new(BTreeMap::new()),
            live: broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

impl OutputLog {
    /// Every chunk pushed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Streamed>> {
        self.live.subscribe()
    }

    /// Appends a chunk (a repeated one is ignored) and hands it to the followers.
    pub fn push(&self, node: UserId, chunk: TaskOutput) {
        if self.keep(node.clone(), chunk.clone()) {
            // No followers is the common case, not an error.
            let _ = self.live.send(Arc::new(Streamed { node, chunk }));
        }
    }

    /// Appends a chunk; `false` if it was a repeat.
    fn keep(&self, node: UserId, chunk: TaskOutput) -> bool {
        let Ok(mut map) = self.inner.lock() else {
            return false;
        };
        let key = (chunk.task_id, node);
        if !map.contains_key(&key) && map.len() >= MAX_TARGETS {
            // Task ids grow, so the first key belongs to the oldest task.
            let oldest = map.keys().next().cloned();
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        let buf = map.entry(key).or_default();
        if buf
            .chunks
            .iter()
            .any(|c| c.attempt == chunk.attempt && c.seq == chunk.seq)
        {
            return false;
        }
        buf.bytes += chunk.data.len();
        buf.chunks.push_back(chunk);
        while buf.bytes > MAX_BYTES_PER_TARGET {
            match buf.chunks.pop_front() {
                Some(old) => buf.bytes -= old.data.len(),
                None => break,
            }
        }
        true
    }

    /// Every kept chunk of a task, per node, in (attempt, sequence) order.
    pub fn for_task(&self, task_id: TaskId) -> BTreeMap<UserId, Vec<TaskOutput>> {
        let Ok(map) = self.inner.lock() else {
            return BTreeMap::new();
        };
        map.iter()
            .filter(|((t, _), _)| *t == task_id)
            .map(|((_, node), buf)| {
                let mut chunks: Vec<TaskOutput> = buf.chunks.iter().cloned().collect();
                chunks.sort_by_key(|c| (c.attempt, c.seq));
                (node.clone(), chunks)
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use messages::fleet::Stream;

    fn chunk(task_id: TaskId, seq: u64, data: &str) -> TaskOutput {
        TaskOutput {
            task_id,
            attempt: 1,
            seq,
            stream: Stream::Stdout,
            offset: 0,
            data: data.into(),
        }
    }

    #[test]
    fn keeps_order_drops_repeats_and_bounds_bytes() {
        let log = OutputLog::default();
        let n = UserId::new("n1").unwrap();
        log.push(n.clone(), chunk(1, 1, "b"));
        log.push(n.clone(), chunk(1, 0, "a"));
        log.push(n.clone(), chunk(1, 0, "a"));
        let got = log.for_task(1);
        let data: Vec<&str> = got[&n].iter().map(|c| c.data.as_str()).collect();
        assert_eq!(data, ["a", "b"]);
        let big = "x".repeat(MAX_BYTES_PER_TARGET);
        log.push(n.clone(), chunk(1, 2, &big));
        let got = log.for_task(1);
        assert_eq!(got[&n].len(), 1);
        assert!(log.for_task(2).is_empty());
    }

    #[test]
    fn followers_get_new_chunks_once() {
        let log = OutputLog::default();
        let n = UserId::new("n1").unwrap();
        let mut rx = log.subscribe();
        log.push(n.clone(), chunk(3, 0, "a"));
        log.push(n.clone(), chunk(3, 0, "a"));
        let mut again = chunk(3, 0, "a");
        again.attempt = 2;
        log.push(n.clone(), again);
        assert_eq!(rx.try_recv().unwrap().chunk.attempt, 1);
        assert_eq!(rx.try_recv().unwrap().chunk.attempt, 2);
        assert!(rx.try_recv().is_err());
    }
}
