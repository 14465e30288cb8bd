//! Following a task's output live: the Server-Sent Events stream behind
//! `GET /v1/tasks/{id}/output?follow=1` (what `schedctl run --follow` reads).
//!
//! A follower first gets every chunk the scheduler still keeps for the task, then each new
//! one as the agents stream it, then one `result` event per target as it finishes and an
//! `end` event once every target has. Chunks are in order per node and attempt; where
//! sequence numbers jump (the agent dropped chunks it could not send, or the kept window
//! starts later), a `gap` event says which chunks are missing. The final output is in the
//! `result` events' tails, which never depend on the streamed chunks.
//!
//! Events (`data` is one line of JSON):
//! - `output`: `{node, attempt, seq, stream, offset, data}`
//! - `gap`: `{node, attempt, from_seq, to_seq}` (inclusive)
//! - `result`: `{node, state, attempts, exit_code, error, stdout_tail, stderr_tail,
//!   output_chunks}`,
//!   preceded by a `gap` when the result says the attempt cut more chunks than arrived
//! - `lagged`: `{missed}`: this follower fell behind; kept chunks are sent again (repeats
//!   are filtered, so only chunks no longer kept are lost)
//! - `end`: `{task_id}`; the stream then closes.
//!
//! A comment line (`: keep-alive`) goes out every [`KEEP_ALIVE`] so proxies keep an idle
//! stream open. Target states are read from the store every [`POLL`]; chunks arrive as
//! they are consumed from the bus.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use messages::UserId;
use messages::fleet::TaskOutput;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::Shared;
use crate::bus::blocking;
use crate::store::{TargetStatus, TaskId};

/// How often target states are read.
pub(crate) const POLL: Duration = Duration::from_millis(200);
/// How often an idle stream gets a comment line.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Followers one scheduler serves at once; more get 503.
pub(crate) const MAX_FOLLOWERS: usize = 256;

/// One SSE event.
pub(crate) fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// A follower slot, released when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Shared>);

impl Slot {
    /// Takes a slot, or `None` when [`MAX_FOLLOWERS`] are following.
    pub(crate) fn take(shared: &Arc<Shared>) -> Option<Slot> {
        shared
            .followers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_FOLLOWERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(shared)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where the stream stands per node and attempt.
#[derive(Debug, Default)]
struct Cursor {
    /// The next sequence number expected per (node, attempt).
    next: HashMap<(UserId, u32), u64>,
    /// Targets whose result was sent.
    done: BTreeSet<UserId>,
}

impl Cursor {
    /// The events for one chunk: nothing for a repeat, a gap first if numbers were skipped.
    fn chunk(&mut self, node: &UserId, chunk: &TaskOutput) -> Vec<Bytes> {
        let expected = self.next.entry((node.clone(), chunk.attempt)).or_insert(0);
        if chunk.seq < *expected {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(2);
        if chunk.seq > *expected {
            out.push(event(
                "gap",
                &json!({
                    "node": node.as_str(),
                    "attempt": chunk.attempt,
                    "from_seq": *expected,
                    "to_seq": chunk.seq - 1,
                }),
            ));
        }
        *expected = chunk.seq + 1;
        out.push(event(
            "output",
            &json!({
                "node": node.as_str(),
                "attempt": chunk.attempt,
                "seq": chunk.seq,
                "stream": chunk.stream,
                "offset": chunk.offset,
                "data": chunk.data,
            }),
        ));
        out
    }
}

impl Cursor {
    /// A gap for the chunks at the end of the last attempt that never arrived: only the
    /// result says how many there were.
    fn missing_end(&self, node: &UserId, status: &TargetStatus) -> Option<Bytes> {
        let total = status.result.as_ref()?.output_chunks;
        let attempt = status.attempts;
        let seen = self
            .next
            .get(&(node.clone(), attempt))
            .copied()
            .unwrap_or(0);
        (total > seen).then(|| {
            event(
                "gap",
                &json!({
                    "node": node.as_str(),
                    "attempt": attempt,
                    "from_seq": seen,
                    "to_seq": total - 1,
                }),
            )
        })
    }
}

fn result_event(node: &UserId, status: &TargetStatus) -> Bytes {
    let result = status.result.as_ref();
    event(
        "result",
        &json!({
            "node": node.as_str(),
            "state": status.state,
            "attempts": status.attempts,
            "exit_code": result.and_then(|r| r.exit_code),
            "error": result.and_then(|r| r.error.clone()),
            "stdout_tail": result.map(|r| r.stdout_tail.as_str()),
            "stderr_tail": result.map(|r| r.stderr_tail.as_str()),
            "output_chunks": result.map(|r| r.output_chunks),
        }),
    )
}

/// The follower went away (its receiver was dropped) or the store failed.
struct Stop;

async fn send(tx: &mpsc::Sender<Bytes>, events: Vec<Bytes>) -> Result<(), Stop> {
    for e in events {
        tx.send(e).await.map_err(|_| Stop)?;
    }
    Ok(())
}

/// Feeds `tx` with the events of `task_id` until every target finished or the follower
/// leaves. Holds `slot` for as long as it runs.
pub(crate) async fn run(shared: Arc<Shared>, task_id: TaskId, tx: mpsc::Sender<Bytes>, slot: Slot) {
    let _ = follow(&shared, task_id, &tx).await;
    drop(slot);
}

async fn follow(shared: &Shared, task_id: TaskId, tx: &mpsc::Sender<Bytes>) -> Result<(), Stop> {
    // Subscribe before reading the kept chunks, so nothing falls between the two.
    let mut live = shared.output.subscribe();
    let mut cursor = Cursor::default();
    send(tx, vec![Bytes::from(format!(": task {task_id}\n\n"))]).await?;
    replay(shared, task_id, &mut cursor, tx).await?;
    let mut poll = tokio::time::interval(POLL);
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            r = live.recv() => match r {
                Ok(s) if s.chunk.task_id == task_id => {
                    send(tx, cursor.chunk(&s.node, &s.chunk)).await?;
                    quiet_since = tokio::time::Instant::now();
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    send(tx, vec![event("lagged", &json!({ "missed": missed }))]).await?;
                    replay(shared, task_id, &mut cursor, tx).await?;
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            _ = poll.tick() => {
                // Chunks already broadcast go out before the results that follow them.
                while let Ok(s) = live.try_recv() {
                    if s.chunk.task_id == task_id {
                        send(tx, cursor.chunk(&s.node, &s.chunk)).await?;
                    }
                }
                if finished(shared, task_id, &mut cursor, tx).await? {
                    return send(tx, vec![event("end", &json!({ "task_id": task_id }))]).await;
                }
                if quiet_since.elapsed() >= KEEP_ALIVE {
                    send(tx, vec![Bytes::from_static(b": keep-alive\n\n")]).await?;
                    quiet_since = tokio::time::Instant::now();
                }
            }
        }
    }
}

/// Sends the kept chunks the follower has not seen.
async fn replay(
    shared: &Shared,
    task_id: TaskId,
    cursor: &mut Cursor,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), Stop> {
    for (node, chunks) in shared.output.for_task(task_id) {
        for chunk in &chunks {
            send(tx, cursor.chunk(&node, chunk)).await?;
        }
    }
    Ok(())
}

/// Sends a `result` for every newly finished target; `true` once all have finished.
async fn finished(
    shared: &Shared,
    task_id: TaskId,
    cursor: &mut Cursor,
    tx: &mpsc::Sender<Bytes>,
) -> Result<bool, Stop> {
    let task = match blocking(shared, move |store| store.task(task_id)).await {
        Ok(Some(task)) => task,
        // Gone (it cannot be deleted today) or unreadable: end the stream, loudly.
        Ok(None) => return Ok(true),
        Err(e) => {
            tracing::warn!(task_id, error = %e, "Following a task: the store failed.");
            send(tx, vec![event("error", &json!({ "error": e.to_string() }))]).await?;
            return Err(Stop);
        }
    };
    let mut events = Vec::new();
    for (node, status) in &task.targets {
        if status.state.is_terminal() && cursor.done.insert(node.clone()) {
            events.extend(cursor.missing_end(node, status));
            events.push(result_event(node, status));
        }
    }
    send(tx, events).await?;
    Ok(task.targets.values().all(|s| s.state.is_terminal()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use messages::fleet::Stream;

    fn chunk(attempt: u32, seq: u64) -> TaskOutput {
        TaskOutput {
            task_id: 1,
            attempt,
            seq,
            stream: Stream::Stdout,
            offset: 0,
            data: format!("{seq}"),
        }
    }

    fn names(events: &[Bytes]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let text = std::str::from_utf8(e).unwrap();
                text.lines()
                    .next()
                    .unwrap()
                    .trim_start_matches("event: ")
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn the_cursor_reports_gaps_and_skips_repeats() {
        let n = UserId::new("n").unwrap();
        let mut c = Cursor::default();
        assert_eq!(names(&c.chunk(&n, &chunk(1, 0))), ["output"]);
        assert!(c.chunk(&n, &chunk(1, 0)).is_empty());
        let e = c.chunk(&n, &chunk(1, 3));
        assert_eq!(names(&e), ["gap", "output"]);
        let gap = std::str::from_utf8(&e[0]).unwrap();
        assert!(
            gap.contains(r#""from_seq":1"#) && gap.contains(r#""to_seq":2"#),
            "{gap}"
        );
        // A new attempt starts its own numbering.
        assert_eq!(names(&c.chunk(&n, &chunk(2, 0))), ["output"]);
    }
}
