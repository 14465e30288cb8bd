//! Recent output of running commands, as the agents stream it (`agent.task.output`).
//!
//! Chunks are best effort on the wire (not outboxed), so they are kept in memory only and
//! bounded: per target the newest [`MAX_BYTES_PER_TARGET`] bytes, and at most
//! [`MAX_TARGETS`] targets (the oldest tasks are forgotten first). The final tails of
//! stdout and stderr are part of the durable result anyway.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use messages::UserId;
use messages::fleet::TaskOutput;

use crate::store::TaskId;

/// Output bytes kept per (task, node).
pub const MAX_BYTES_PER_TARGET: usize = 64 * 1024;
/// Targets whose output is kept.
pub const MAX_TARGETS: usize = 4096;

#[derive(Debug, Default)]
struct Buffer {
    chunks: VecDeque<TaskOutput>,
    bytes: usize,
}

/// The in-memory output log.
#[derive(Debug, Default)]
pub struct OutputLog {
    inner: Mutex<BTreeMap<(TaskId, UserId), Buffer>>,
}

impl OutputLog {
    /// Appends a chunk (a repeated sequence number is ignored).
    pub fn push(&self, node: UserId, chunk: TaskOutput) {
        let Ok(mut map) = self.inner.lock() else {
            return;
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
            .any(|c| c.seq == chunk.seq && c.stream == chunk.stream)
        {
            return;
        }
        buf.bytes += chunk.data.len();
        buf.chunks.push_back(chunk);
        while buf.bytes > MAX_BYTES_PER_TARGET {
            match buf.chunks.pop_front() {
                Some(old) => buf.bytes -= old.data.len(),
                None => break,
            }
        }
    }

    /// Every kept chunk of a task, per node, in sequence order.
    pub fn for_task(&self, task_id: TaskId) -> BTreeMap<UserId, Vec<TaskOutput>> {
        let Ok(map) = self.inner.lock() else {
            return BTreeMap::new();
        };
        map.iter()
            .filter(|((t, _), _)| *t == task_id)
            .map(|((_, node), buf)| {
                let mut chunks: Vec<TaskOutput> = buf.chunks.iter().cloned().collect();
                chunks.sort_by_key(|c| c.seq);
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
            seq,
            stream: Stream::Stdout,
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
}
