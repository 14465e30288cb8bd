//! Which broadcasts a session should have received: a push stamped while a connection was
//! open (after its welcome, and early enough before it ended to have arrived) and that the
//! connection never got is lost inside a session, whatever its place in the session. The
//! gap count of [`crate::worker`] only sees holes between a session's first and last push;
//! under churn most sessions last a few pushes, so a missed first or last push, or a
//! session that got none, would go unseen there.
//!
//! A worker learns each push's send time (stamped in its body by the publisher, same
//! machine clock) from the first of its connections that receives it.

use std::sync::Mutex;

/// A push stamped this soon after the welcome is not counted: the stamp is taken before
/// the publish call, so it may precede the gateway's fan-out by a little.
pub(crate) const AFTER_WELCOME_US: u64 = 100_000;
/// A push stamped this close to a session's end is not counted: it may still have been on
/// its way when the session ended (delivery p99 under churn is well below 1 s).
pub(crate) const BEFORE_END_US: u64 = 2_000_000;

/// Send time of every push a worker has seen, by sequence number.
#[derive(Debug, Default)]
pub(crate) struct PushTimes {
    /// `(seq, stamped Unix µs)`, sorted by seq (and therefore by time: the publisher
    /// stamps in order).
    sent: Mutex<Vec<(u64, u64)>>,
}

impl PushTimes {
    /// Records push `seq`'s send time (once).
    pub(crate) fn note(&self, seq: u64, sent_us: u64) {
        let mut sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(at) = sent.binary_search_by_key(&seq, |(s, _)| *s) {
            sent.insert(at, (seq, sent_us));
        }
    }

    /// Pushes stamped inside `(welcome_us + AFTER_WELCOME_US, end_us - BEFORE_END_US)` that
    /// are not in `got` (the sequence numbers the session received, sorted).
    pub(crate) fn missed(&self, welcome_us: u64, end_us: u64, got: &[u64]) -> u64 {
        let from = welcome_us.saturating_add(AFTER_WELCOME_US);
        let to = end_us.saturating_sub(BEFORE_END_US);
        if to <= from {
            return 0;
        }
        let sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = sent.partition_point(|(_, t)| *t <= from);
        sent[start..]
            .iter()
            .take_while(|(_, t)| *t < to)
            .filter(|(seq, _)| got.binary_search(seq).is_err())
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_pushes_stamped_well_inside_the_session() {
        let times = PushTimes::default();
        for seq in 1..=10u64 {
            times.note(seq, seq * 1_000_000);
        }
        times.note(3, 99);
        // Open from 2.5 s to 9.5 s: pushes 3..=7 are inside (8 and 9 are too close to the end).
        assert_eq!(times.missed(2_500_000, 9_500_000, &[3, 4, 5, 6, 7]), 0);
        assert_eq!(times.missed(2_500_000, 9_500_000, &[4, 6]), 3);
        assert_eq!(times.missed(2_500_000, 3_000_000, &[]), 0);
    }
}
