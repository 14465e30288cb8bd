//! Reconnect delays: capped exponential backoff with jitter.
//!
//! This module owns only the arithmetic (how long to wait before attempt `n`) and the
//! validation of its three settings; the connection loop owns the attempt counter and the
//! sleeping. Jitter matters here because thousands of agents lose their gateway at the same
//! moment when it restarts: without it they would all come back in lockstep.

use std::time::Duration;

/// Why backoff settings were rejected.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum BackoffError {
    /// `base` is zero: every delay would be zero and a dead gateway would be hammered.
    #[error("backoff base must be greater than zero")]
    ZeroBase,
    /// `base` is greater than `cap`.
    #[error("backoff base ({base:?}) is greater than its cap ({cap:?})")]
    BaseAboveCap {
        /// The base delay.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
    /// `jitter` is outside `[0, 1]` or not a number.
    #[error("backoff jitter {0} is outside [0, 1]")]
    Jitter(f64),
}

/// Validated exponential backoff: attempt `n` waits about `base * 2^n`, at most `cap`,
/// spread by `±jitter` (a fraction of the delay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    base: Duration,
    cap: Duration,
    jitter: f64,
}

impl Default for ExponentialBackoff {
    /// 100 ms base, 30 s cap, 0.3 jitter (the issue's defaults).
    fn default() -> Self {
        ExponentialBackoff {
            base: Self::DEFAULT_BASE,
            cap: Self::DEFAULT_CAP,
            jitter: Self::DEFAULT_JITTER,
        }
    }
}

impl ExponentialBackoff {
    /// Default first delay.
    pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
    /// Default longest delay.
    pub const DEFAULT_CAP: Duration = Duration::from_secs(30);
    /// Default jitter fraction.
    pub const DEFAULT_JITTER: f64 = 0.3;

    /// Validates and builds: `base > 0`, `base <= cap`, `jitter` in `[0, 1]`.
    pub fn new(base: Duration, cap: Duration, jitter: f64) -> Result<Self, BackoffError> {
        if base.is_zero() {
            return Err(BackoffError::ZeroBase);
        }
        if base > cap {
            return Err(BackoffError::BaseAboveCap { base, cap });
        }
        // `contains` is false for NaN, so NaN is rejected too.
        if !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::Jitter(jitter));
        }
        Ok(ExponentialBackoff { base, cap, jitter })
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter fraction, in `[0, 1]`.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The delay before attempt `attempt` (0 for the first retry), randomised.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::random::<f64>())
    }

    /// The delay before attempt `attempt`, with `rng_value` in `[0, 1]` standing in for the
    /// random draw (0 gives the shortest delay, 1 the longest); values outside are clamped
    /// and NaN counts as 0. Deterministic, for tests and for callers with their own RNG.
    ///
    /// The result lies in `[d * (1 - jitter), min(d * (1 + jitter), cap)]` where
    /// `d = min(base * 2^attempt, cap)`.
    pub fn delay_with(&self, attempt: u32, rng_value: f64) -> Duration {
        let nominal = self.nominal(attempt);
        let r = if rng_value.is_nan() {
            0.0
        } else {
            rng_value.clamp(0.0, 1.0)
        };
        // Float arithmetic on nanoseconds: exact enough (53 bits) for any realistic delay,
        // and rounding to the nearest nanosecond keeps e.g. 100 ms * 0.7 at exactly 70 ms.
        let d = nominal.as_nanos() as f64;
        let cap = self.cap.as_nanos() as f64;
        let low = d * (1.0 - self.jitter);
        // Clamping the upper end (instead of clamping the drawn value) keeps the draw
        // uniform over what is left: once the nominal delay reaches the cap, agents still
        // spread over [cap * (1 - jitter), cap] rather than half of them landing exactly on
        // the cap together.
        let high = (d * (1.0 + self.jitter)).min(cap);
        let nanos = (low + r * (high - low)).round();
        // `as` saturates (and maps NaN to 0), and rounding could step a hair past the cap:
        // the final `min` keeps the promise "never above cap".
        duration_from_nanos(nanos as u128).min(self.cap)
    }

    /// `min(base * 2^attempt, cap)` without jitter, computed in integer nanoseconds so it
    /// neither overflows nor loses precision for any attempt number.
    fn nominal(&self, attempt: u32) -> Duration {
        let cap_nanos = self.cap.as_nanos();
        // 2^127 fits in a u128; any larger factor saturates to the cap anyway because base
        // is at least one nanosecond.
        let factor = 1u128 << attempt.min(127);
        let nanos = self.base.as_nanos().saturating_mul(factor).min(cap_nanos);
        duration_from_nanos(nanos)
    }
}

/// A duration of `nanos` nanoseconds, saturating at [`Duration::MAX`].
fn duration_from_nanos(nanos: u128) -> Duration {
    const BILLION: u128 = 1_000_000_000;
    match u64::try_from(nanos / BILLION) {
        // The remainder is below one billion, so it fits a u32.
        Ok(secs) => Duration::new(secs, u32::try_from(nanos % BILLION).unwrap_or(0)),
        Err(_) => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn defaults_match_the_issue() {
        let b = ExponentialBackoff::default();
        assert_eq!(b.base(), ms(100));
        assert_eq!(b.cap(), Duration::from_secs(30));
        assert!((b.jitter() - 0.3).abs() < f64::EPSILON);
        assert_eq!(
            ExponentialBackoff::new(b.base(), b.cap(), b.jitter()),
            Ok(b)
        );
    }

    #[test]
    fn doubles_each_attempt_without_jitter() {
        let b = ExponentialBackoff::new(ms(100), Duration::from_secs(30), 0.0).unwrap();
        let got: Vec<_> = (0..9).map(|a| b.delay(a)).collect();
        let want: Vec<_> = [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600]
            .into_iter()
            .map(ms)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn midpoint_draw_is_the_nominal_delay() {
        let b = ExponentialBackoff::default();
        assert_eq!(b.delay_with(0, 0.5), ms(100));
        assert_eq!(b.delay_with(3, 0.5), ms(800));
        assert_eq!(b.delay_with(0, 0.0), ms(70));
        assert_eq!(b.delay_with(0, 1.0), ms(130));
    }

    #[test]
    fn caps_and_spreads_below_the_cap() {
        let b = ExponentialBackoff::default();
        let cap = Duration::from_secs(30);
        // 100 ms * 2^9 = 51.2 s > cap.
        assert_eq!(b.delay_with(9, 1.0), cap);
        assert_eq!(b.delay_with(9, 0.0), ms(21_000));
        assert!(b.delay_with(9, 0.5) < cap, "draws at the cap still spread");
        for a in 9..200 {
            assert!(b.delay(a) <= cap);
        }
    }

    #[test]
    fn jitter_stays_in_bounds_over_many_samples() {
        let b = ExponentialBackoff::default();
        for attempt in [0u32, 1, 4, 8, 20] {
            let low = b.delay_with(attempt, 0.0);
            let high = b.delay_with(attempt, 1.0);
            let nominal = (b.base() * 2u32.pow(attempt)).min(b.cap());
            assert_eq!(low, nominal * 7 / 10);
            assert_eq!(high, (nominal * 13 / 10).min(b.cap()));
            let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
            for _ in 0..10_000 {
                let d = b.delay(attempt);
                assert!(d >= low && d <= high, "{d:?} outside [{low:?}, {high:?}]");
                min = min.min(d);
                max = max.max(d);
            }
            // The draws really are spread, not constant: 10,000 uniform draws cover well
            // over half of the range (failing this by chance is astronomically unlikely).
            assert!(
                max - min > (high - low) / 2,
                "attempt {attempt}: {min:?}..{max:?}"
            );
        }
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let b = ExponentialBackoff::default();
        for a in [31, 32, 63, 64, 65, 127, 128, 1_000, u32::MAX] {
            assert_eq!(b.delay_with(a, 1.0), b.cap());
            assert_eq!(b.delay_with(a, 0.0), ms(21_000));
        }
        // Extreme but valid settings.
        let wide = ExponentialBackoff::new(Duration::from_nanos(1), Duration::MAX, 1.0).unwrap();
        for a in [0, 1, 64, 127, 128, u32::MAX] {
            for r in [0.0, 0.5, 1.0] {
                assert!(wide.delay_with(a, r) <= Duration::MAX);
            }
        }
        assert_eq!(wide.delay_with(0, 0.0), Duration::ZERO);
    }

    #[test]
    fn out_of_range_draws_are_clamped() {
        let b = ExponentialBackoff::default();
        assert_eq!(b.delay_with(0, -5.0), b.delay_with(0, 0.0));
        assert_eq!(b.delay_with(0, 7.0), b.delay_with(0, 1.0));
        assert_eq!(b.delay_with(0, f64::NAN), b.delay_with(0, 0.0));
        assert_eq!(b.delay_with(0, f64::INFINITY), b.delay_with(0, 1.0));
    }

    #[test]
    fn rejects_invalid_settings() {
        let s = Duration::from_secs(1);
        assert_eq!(
            ExponentialBackoff::new(Duration::ZERO, s, 0.3),
            Err(BackoffError::ZeroBase)
        );
        assert_eq!(
            ExponentialBackoff::new(ms(2000), ms(1000), 0.3),
            Err(BackoffError::BaseAboveCap {
                base: ms(2000),
                cap: ms(1000)
            })
        );
        for j in [-0.1, 1.01, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                ExponentialBackoff::new(s, s, j),
                Err(BackoffError::Jitter(j))
            );
        }
        assert!(matches!(
            ExponentialBackoff::new(s, s, f64::NAN),
            Err(BackoffError::Jitter(j)) if j.is_nan()
        ));
        // Edges are valid.
        assert!(ExponentialBackoff::new(s, s, 0.0).is_ok());
        assert!(ExponentialBackoff::new(s, s, 1.0).is_ok());
    }
}
