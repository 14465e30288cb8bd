//! The dynamic heartbeat of one session (seed 002): a pure state machine over instants the
//! caller passes in, so it is tested with controlled time and the actor only asks it
//! "what interval next?" and "when is the deadline?".
//!
//! The client beats at the interval the last heartbeat ack gave it. A beat is on time when
//! it arrives no later than 10 % after that interval; after `grow_after` consecutive
//! on-time beats the interval grows by `step_ms`, up to `max_ms`. A late beat drops the
//! interval back to `base_ms`. Any frame from the client counts as activity, and a session
//! with no activity for `interval + grace_ms` is past its deadline.

use std::time::{Duration, Instant};

use messages::payload::HeartbeatParams;

/// Heartbeat state of one session.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    params: HeartbeatParams,
    /// Interval the client was last told to use.
    interval_ms: u32,
    /// Consecutive on-time beats since the last growth or reset.
    on_time: u32,
    /// When the previous beat (or the session) started the current interval.
    last_beat: Instant,
    /// Last frame of any kind.
    last_activity: Instant,
}

/// What a beat did to the interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// On time; interval unchanged.
    OnTime,
    /// On time and the interval grew.
    Grew,
    /// Late; the interval went back to the base.
    Late,
}

impl Heartbeat {
    /// A session that starts now at the base interval.
    pub(crate) fn new(params: HeartbeatParams, now: Instant) -> Self {
        Heartbeat {
            params,
            interval_ms: params.base_ms,
            on_time: 0,
            last_beat: now,
            last_activity: now,
        }
    }

    /// The interval the client should use now.
    pub(crate) fn interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// Records a heartbeat at `now` and returns what it did; [`Heartbeat::interval_ms`] is
    /// then the interval to put in the ack.
    pub(crate) fn on_beat(&mut self, now: Instant) -> Beat {
        let elapsed = now.saturating_duration_since(self.last_beat);
        let allowed = ms(self.interval_ms) + ms(self.interval_ms / 10);
        self.last_beat = now;
        self.last_activity = now;
        if elapsed > allowed {
            self.interval_ms = self.params.base_ms;
            self.on_time = 0;
            return Beat::Late;
        }
        self.on_time += 1;
        if self.on_time >= self.params.grow_after.max(1) && self.interval_ms < self.params.max_ms {
            self.on_time = 0;
            self.interval_ms = self
                .interval_ms
                .saturating_add(self.params.step_ms)
                .min(self.params.max_ms);
            return Beat::Grew;
        }
        Beat::OnTime
    }

    /// Records any other frame from the client.
    pub(crate) fn on_activity(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// When the session expires if nothing else arrives.
    pub(crate) fn deadline(&self) -> Instant {
        self.last_activity + ms(self.interval_ms) + ms(self.params.grace_ms)
    }

    /// Whether the session is past its deadline at `now`.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now > self.deadline()
    }
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> HeartbeatParams {
        HeartbeatParams {
            base_ms: 10_000,
            step_ms: 5_000,
            max_ms: 20_000,
            grow_after: 3,
            grace_ms: 5_000,
        }
    }

    #[test]
    fn grows_after_every_x_good_beats_up_to_the_max() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(params(), t0);
        let mut t = t0;
        let mut seen = vec![];
        for _ in 0..9 {
            t += ms(hb.interval_ms());
            let beat = hb.on_beat(t);
            seen.push((beat, hb.interval_ms()));
        }
        assert_eq!(
            seen,
            vec![
                (Beat::OnTime, 10_000),
                (Beat::OnTime, 10_000),
                (Beat::Grew, 15_000),
                (Beat::OnTime, 15_000),
                (Beat::OnTime, 15_000),
                (Beat::Grew, 20_000),
                (Beat::OnTime, 20_000),
                (Beat::OnTime, 20_000),
                (Beat::OnTime, 20_000),
            ]
        );
    }

    #[test]
    fn a_late_beat_resets_to_the_base() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(params(), t0);
        let mut t = t0;
        for _ in 0..3 {
            t += ms(10_000);
            hb.on_beat(t);
        }
        assert_eq!(hb.interval_ms(), 15_000);
        // 10 % slack is still on time.
        t += ms(16_500);
        assert_eq!(hb.on_beat(t), Beat::OnTime);
        t += ms(16_501);
        assert_eq!(hb.on_beat(t), Beat::Late);
        assert_eq!(hb.interval_ms(), 10_000);
        // The count starts over after a reset.
        t += ms(10_000);
        assert_eq!(hb.on_beat(t), Beat::OnTime);
    }

    #[test]
    fn deadline_follows_activity_and_the_current_interval() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(params(), t0);
        assert_eq!(hb.deadline(), t0 + ms(15_000));
        assert!(!hb.expired(t0 + ms(15_000)));
        assert!(hb.expired(t0 + ms(15_001)));
        hb.on_activity(t0 + ms(12_000));
        assert_eq!(hb.deadline(), t0 + ms(27_000));
        assert!(!hb.expired(t0 + ms(20_000)));
    }
}
