//! The wall clock every service reads: Unix time in micro-, milli- or whole seconds, all
//! from one reading function, so timestamps in messages, stores and tokens agree on what
//! "now" means and on what a clock before 1970 gives (0) or one past `u64` (saturates).
//!
//! Durations and deadlines use `tokio::time::Instant`; this module is only for instants
//! that leave the process (wire timestamps, stored times, token expiry).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch; zero if the system clock is set before 1970.
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Unix microseconds now.
pub fn now_micros() -> u64 {
    u64::try_from(since_epoch().as_micros()).unwrap_or(u64::MAX)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// Unix seconds now (JWT `iat`/`exp` and other second-resolution stamps).
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_agree() {
        let (s, ms, us) = (now_secs(), now_ms(), now_micros());
        assert!(s > 1_600_000_000);
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1);
        assert!(us / 1000 >= ms && us / 1000 - ms <= 1000);
    }
}
