//! A simulated agent's outbox: the results and config acks it sent and has not seen an
//! `agent.ack` for, kept by its connection slot across sessions as services/agent keeps
//! them on disk (`docs/protocol.md`, "Delivery of agent reports"). An entry is stored
//! before it is sent, so a send that fails with the connection still leaves it here;
//! after every register the next session sends every entry again ([`Outbox::replay`]),
//! and within a session an entry unacknowledged for `resend_after_ms` is sent again
//! ([`Outbox::due`]). The scheduler ingests by message id, so a copy costs an ack, never
//! a duplicate. This module owns the bookkeeping; the worker's session does the sending.

use std::collections::HashMap;
use std::time::Duration;

use messages::Route;
use tokio::time::Instant;

/// One outboxed message.
struct Entry {
    route: Route,
    body: Vec<u8>,
    /// When it was last handed to a connection.
    sent: Instant,
}

/// Message id -> what to send again until it is acknowledged.
#[derive(Default)]
pub(crate) struct Outbox {
    entries: HashMap<String, Entry>,
}

impl Outbox {
    /// Stores a message about to be sent at `now`.
    pub(crate) fn add(&mut self, id: String, route: Route, body: Vec<u8>, now: Instant) {
        self.entries.insert(
            id,
            Entry {
                route,
                body,
                sent: now,
            },
        );
    }

    /// Forgets an acknowledged message; false when it was not (or no longer) here.
    pub(crate) fn ack(&mut self, id: &str) -> bool {
        self.entries.remove(id).is_some()
    }

    /// Every entry, for a session that just registered; each counts as sent at `now`.
    pub(crate) fn replay(&mut self, now: Instant) -> Vec<(Route, Vec<u8>)> {
        self.take(now, |_| true)
    }

    /// The entries sent at least `after` before `now` and still unacknowledged; each
    /// counts as sent again at `now`.
    pub(crate) fn due(&mut self, now: Instant, after: Duration) -> Vec<(Route, Vec<u8>)> {
        self.take(now, |e| now.duration_since(e.sent) >= after)
    }

    fn take(&mut self, now: Instant, pick: impl Fn(&Entry) -> bool) -> Vec<(Route, Vec<u8>)> {
        let mut out = Vec::new();
        for e in self.entries.values_mut().filter(|e| pick(e)) {
            e.sent = now;
            out.push((e.route.clone(), e.body.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route::new(messages::fleet::up::RESULT).unwrap()
    }

    #[test]
    fn an_entry_unacknowledged_when_a_session_ends_is_replayed_by_the_next_one() {
        let t0 = Instant::now();
        let mut outbox = Outbox::default();
        outbox.add("a".to_owned(), route(), b"result a".to_vec(), t0);
        outbox.add("b".to_owned(), route(), b"result b".to_vec(), t0);
        assert!(outbox.ack("a"));
        // The connection is lost before "b" is acknowledged; the next session registers.
        let replayed = outbox.replay(t0 + Duration::from_millis(100));
        assert_eq!(replayed.len(), 1);
        assert_eq!(replayed[0].1, b"result b".to_vec());
        assert_eq!(
            outbox.replay(t0 + Duration::from_millis(200)).len(),
            1,
            "a replayed entry stays until acknowledged"
        );
        assert!(outbox.ack("b"));
        assert!(!outbox.ack("b"));
        assert!(outbox.replay(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn within_a_session_only_entries_unacknowledged_for_resend_after_are_due() {
        let t0 = Instant::now();
        let after = Duration::from_secs(15);
        let mut outbox = Outbox::default();
        outbox.add("old".to_owned(), route(), b"old".to_vec(), t0);
        outbox.add(
            "new".to_owned(),
            route(),
            b"new".to_vec(),
            t0 + Duration::from_secs(10),
        );
        let due = outbox.due(t0 + after, after);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1, b"old".to_vec());
        // Sent again just now: not due again until another `after` has passed.
        assert!(
            outbox
                .due(t0 + after + Duration::from_secs(1), after)
                .is_empty()
        );
        assert_eq!(outbox.due(t0 + after + after, after).len(), 2);
    }
}
