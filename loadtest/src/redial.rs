//! Where and when a worker's lost connection is opened again (`--reconnect`), by the rule
//! services/agent follows (`services/agent/src/connection.rs`, `docs/protocol.md` 13.1):
//! after any failure, a gateway other than the one that failed, drawn at random among the
//! others; before each attempt, a delay of `min(30 s, 100 ms * 2^n)` spread by ±0.3 (never
//! above 30 s), with `n` the failed attempts since the last welcome. Simulated agents and app clients both
//! follow it, so a killed gateway's connections spread over the survivors the way a real
//! fleet's would. This module owns only the arithmetic and the draws; the connection loop
//! owns the counters and the sleeping.

use std::time::Duration;

/// The gateway to try after `failed` failed, out of `count`: any other, uniformly by
/// `draw` in `[0, 1)` (values outside are clamped). With one gateway, that one.
pub(crate) fn other_gateway(count: usize, failed: usize, draw: f64) -> usize {
    if count <= 1 {
        return 0;
    }
    let failed = failed % count;
    let others = count - 1;
    let d = if draw.is_nan() {
        0.0
    } else {
        draw.clamp(0.0, 1.0)
    };
    let i = ((d * others as f64) as usize).min(others - 1);
    if i >= failed { i + 1 } else { i }
}

/// Longest delay between attempts.
const CAP: Duration = Duration::from_secs(30);

/// The delay before the attempt that follows `failures` failed ones, jittered by `draw`
/// in `[0, 1)`: uniform over `[d * 0.7, min(d * 1.3, 30 s)]` with
/// `d = min(100 ms * 2^failures, 30 s)`, as services/agent's `ExponentialBackoff` draws it
/// (clamping the upper end keeps the spread at the cap instead of piling onto it).
pub(crate) fn backoff(failures: u32, draw: f64) -> Duration {
    let nominal = Duration::from_millis(100u64.saturating_mul(1u64 << failures.min(20))).min(CAP);
    let d = if draw.is_nan() {
        0.0
    } else {
        draw.clamp(0.0, 1.0)
    };
    let low = nominal.mul_f64(0.7);
    let high = nominal.mul_f64(1.3).min(CAP);
    (low + (high - low).mul_f64(d)).min(CAP)
}

/// A fraction in `[0, 1)` from a connection's identity, a counter and the clock: enough of
/// a spread for jitter and gateway choice without an RNG dependency.
pub(crate) fn draw(identity: u128, salt: u32) -> f64 {
    let nanos = u128::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0),
    );
    // splitmix64 over the identity, the time and the salt.
    let mut z = u64::try_from((identity ^ (nanos << 17) ^ u128::from(salt)) & u128::from(u64::MAX))
        .unwrap_or(0)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_gateway_is_never_the_one_that_failed_and_any_other_can_be_drawn() {
        for count in 2..=5 {
            for failed in 0..count {
                let mut seen = vec![false; count];
                for k in 0..1000 {
                    let g = other_gateway(count, failed, f64::from(k) / 1000.0);
                    assert!(g < count, "{g} out of {count}");
                    assert_ne!(g, failed, "count {count}: went back to the failed gateway");
                    seen[g] = true;
                }
                for (g, s) in seen.iter().enumerate() {
                    assert_eq!(*s, g != failed, "count {count}, failed {failed}: {seen:?}");
                }
            }
        }
    }

    #[test]
    fn the_lost_gateways_connections_spread_evenly_over_the_others() {
        // 3 gateways, gateway 1 killed: its connections' draws land on 0 and 2 alike.
        let mut per = [0u32; 3];
        for slot in 0..30_000u128 {
            per[other_gateway(3, 1, draw(slot << 1, 0))] += 1;
        }
        assert_eq!(per[1], 0);
        for n in [per[0], per[2]] {
            assert!((13_500..=16_500).contains(&n), "{per:?}");
        }
    }

    #[test]
    fn one_gateway_is_always_retried_and_edges_are_clamped() {
        assert_eq!(other_gateway(1, 0, 0.5), 0);
        assert_eq!(other_gateway(0, 0, 0.5), 0);
        assert_eq!(other_gateway(3, 0, 1.0), 2);
        assert_eq!(other_gateway(3, 2, 1.0), 1);
        assert_eq!(other_gateway(3, 0, -1.0), 1);
        assert_eq!(other_gateway(3, 0, f64::NAN), 1);
    }

    #[test]
    fn backoff_doubles_from_100_ms_with_0_3_jitter_and_caps_at_30_s() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(0, 0.0), ms(70));
        assert_eq!(backoff(0, 0.5), ms(100));
        assert_eq!(backoff(0, 1.0), ms(130));
        assert_eq!(backoff(3, 0.5), ms(800));
        // At the cap the draws still spread, over [21 s, 30 s].
        assert_eq!(backoff(9, 0.0), ms(21_000));
        assert_eq!(backoff(9, 0.5), ms(25_500));
        assert_eq!(backoff(u32::MAX, 1.0), ms(30_000));
        for k in 0..100 {
            let d = backoff(1, draw(k, 1));
            assert!(d >= ms(140) && d < ms(260), "{d:?}");
        }
    }
}
