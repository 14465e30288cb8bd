//! Snowflake socket ids: 41 bits of milliseconds since [`EPOCH_UNIX_MS`], 10 bits of worker
//! id, 12 bits of per-millisecond sequence (the top bit is always zero).
//!
//! The generator is lock-free (one compare-and-swap on the last id) and keeps a *logical*
//! clock: the millisecond it stamps is `max(wall clock, last stamped ms)`. When 4096 ids
//! are used up within one millisecond it moves on to the next millisecond instead of
//! spinning. When the wall clock steps backwards it keeps counting from where it was, so
//! it never repeats an id. It refuses, with [`SnowflakeError::ClockBehind`], only when its
//! logical clock has got more than `max_lead` ahead of the wall clock (a large step back,
//! or a sustained rate above ~4M ids/s); it never sleeps, because it is called on async
//! threads. A caller that gets the error should refuse the connection and try later.
//!
//! Uniqueness across replicas comes from the worker id, which a gateway leases (see the
//! gateway's lease module); uniqueness across restarts of one replica depends on the
//! restart taking longer than the backwards step of the clock, which the lease TTL makes
//! true in practice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ids::SocketId;

/// 2026-01-01T00:00:00Z in Unix milliseconds; 41 bits of ms from here last until 2095.
pub const EPOCH_UNIX_MS: u64 = 1_767_225_600_000;
/// Bits of worker id.
pub const WORKER_BITS: u32 = 10;
/// Bits of sequence.
pub const SEQUENCE_BITS: u32 = 12;
/// Highest worker id.
pub const MAX_WORKER: u16 = (1 << WORKER_BITS) - 1;
const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;
const TIME_SHIFT: u32 = WORKER_BITS + SEQUENCE_BITS;
const MAX_TIME: u64 = (1 << 41) - 1;

/// A source of wall-clock time; tests inject one that jumps around.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// Why no id was minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SnowflakeError {
    /// The worker id does not fit in 10 bits.
    #[error("worker id {0} is larger than {MAX_WORKER}")]
    WorkerOutOfRange(u16),
    /// The wall clock reads before the project epoch.
    #[error("system clock is before the id epoch")]
    BeforeEpoch,
    /// The logical clock is further ahead of the wall clock than allowed.
    #[error("clock is {lead_ms} ms behind the last id issued; refusing to mint")]
    ClockBehind {
        /// How far the next id would be ahead of the wall clock.
        lead_ms: u64,
    },
    /// 2095 has come.
    #[error("id timestamp space exhausted")]
    Exhausted,
}

/// Mints unique, roughly time-ordered ids for one worker. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Snowflake<C: Clock = SystemClock> {
    worker: u64,
    /// The last id issued (0 before the first); the whole generator state.
    last: AtomicU64,
    max_lead_ms: u64,
    clock: C,
}

impl Snowflake<SystemClock> {
    /// A generator on the system clock tolerating a 1 s backwards step.
    pub fn new(worker: u16) -> Result<Self, SnowflakeError> {
        Self::with_clock(worker, SystemClock, Duration::from_secs(1))
    }
}

impl<C: Clock> Snowflake<C> {
    /// A generator on `clock` that refuses to run more than `max_lead` ahead of it.
    pub fn with_clock(worker: u16, clock: C, max_lead: Duration) -> Result<Self, SnowflakeError> {
        if worker > MAX_WORKER {
            return Err(SnowflakeError::WorkerOutOfRange(worker));
        }
        Ok(Snowflake {
            worker: u64::from(worker),
            last: AtomicU64::new(0),
            max_lead_ms: u64::try_from(max_lead.as_millis()).unwrap_or(u64::MAX),
            clock,
        })
    }

    /// The worker id this generator stamps.
    pub fn worker(&self) -> u16 {
        // Checked in the constructor to fit in 10 bits.
        u16::try_from(self.worker).unwrap_or(MAX_WORKER)
    }

    /// Mints the next id.
    pub fn next_id(&self) -> Result<SocketId, SnowflakeError> {
        let now = self
            .clock
            .now_unix_ms()
            .checked_sub(EPOCH_UNIX_MS)
            .ok_or(SnowflakeError::BeforeEpoch)?;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let last_ms = last >> TIME_SHIFT;
            let last_seq = last & MAX_SEQUENCE;
            let (ms, seq) = if last == 0 || now > last_ms {
                (now, 0)
            } else if last_seq < MAX_SEQUENCE {
                (last_ms, last_seq + 1)
            } else {
                (last_ms + 1, 0)
            };
            if ms > MAX_TIME {
                return Err(SnowflakeError::Exhausted);
            }
            let lead_ms = ms.saturating_sub(now);
            if lead_ms > self.max_lead_ms {
                return Err(SnowflakeError::ClockBehind { lead_ms });
            }
            let id = (ms << TIME_SHIFT) | (self.worker << SEQUENCE_BITS) | seq;
            match self
                .last
                .compare_exchange_weak(last, id, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(SocketId(id)),
                Err(current) => last = current,
            }
        }
    }
}

/// The parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Unix milliseconds the id was stamped with.
    pub unix_ms: u64,
    /// Worker id.
    pub worker: u16,
    /// Sequence within the millisecond.
    pub sequence: u16,
}

impl SocketId {
    /// Splits the id into its fields.
    pub fn parts(self) -> Parts {
        let id = self.0;
        Parts {
            unix_ms: (id >> TIME_SHIFT) + EPOCH_UNIX_MS,
            worker: u16::try_from((id >> SEQUENCE_BITS) & u64::from(MAX_WORKER)).unwrap_or(0),
            sequence: u16::try_from(id & MAX_SEQUENCE).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A clock the test moves by hand.
    #[derive(Debug, Clone, Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        fn at(ms: u64) -> Self {
            ManualClock(Arc::new(AtomicU64::new(ms)))
        }
        fn set(&self, ms: u64) {
            self.0.store(ms, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now_unix_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const T0: u64 = EPOCH_UNIX_MS + 1_000_000;

    #[test]
    fn ids_carry_their_parts() {
        let clock = ManualClock::at(T0);
        let ids = Snowflake::with_clock(513, clock, Duration::from_secs(1)).unwrap();
        let a = ids.next_id().unwrap();
        let b = ids.next_id().unwrap();
        assert_eq!(
            a.parts(),
            Parts {
                unix_ms: T0,
                worker: 513,
                sequence: 0
            }
        );
        assert_eq!(
            b.parts(),
            Parts {
                unix_ms: T0,
                worker: 513,
                sequence: 1
            }
        );
        assert!(a.0 < (1 << 63), "top bit stays clear");
        assert_eq!(ids.worker(), 513);
    }

    #[test]
    fn worker_must_fit_in_ten_bits() {
        assert_eq!(
            Snowflake::new(1024).unwrap_err(),
            SnowflakeError::WorkerOutOfRange(1024)
        );
        assert!(Snowflake::new(1023).is_ok());
    }

    #[test]
    fn sequence_overflow_rolls_into_the_next_millisecond() {
        let clock = ManualClock::at(T0);
        let ids = Snowflake::with_clock(1, clock, Duration::from_secs(1)).unwrap();
        let minted: Vec<_> = (0..4097).map(|_| ids.next_id().unwrap()).collect();
        assert_eq!(minted[4095].parts().sequence, 4095);
        assert_eq!(
            minted[4096].parts(),
            Parts {
                unix_ms: T0 + 1,
                worker: 1,
                sequence: 0
            }
        );
        assert!(minted.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_clock_stepping_back_never_repeats_an_id() {
        let clock = ManualClock::at(T0);
        let ids = Snowflake::with_clock(7, clock.clone(), Duration::from_millis(500)).unwrap();
        let mut seen = HashSet::new();
        let mut previous = SocketId(0);
        for _ in 0..100 {
            let id = ids.next_id().unwrap();
            assert!(seen.insert(id));
            previous = previous.max(id);
        }
        // Step back 200 ms: still within tolerance, ids keep increasing.
        clock.set(T0 - 200);
        for _ in 0..100 {
            let id = ids.next_id().unwrap();
            assert!(id > previous, "ids stay monotonic across a backwards step");
            assert!(seen.insert(id));
            previous = id;
        }
        // Step back further than the tolerance: refuse rather than risk a duplicate.
        clock.set(T0 - 10_000);
        assert_eq!(
            ids.next_id().unwrap_err(),
            SnowflakeError::ClockBehind { lead_ms: 10_000 }
        );
        // The clock catches up: minting resumes, still unique and increasing.
        clock.set(T0 + 5);
        let id = ids.next_id().unwrap();
        assert!(id > previous && seen.insert(id));
    }

    #[test]
    fn before_epoch_is_an_error() {
        let ids = Snowflake::with_clock(0, ManualClock::at(5), Duration::ZERO).unwrap();
        assert_eq!(ids.next_id().unwrap_err(), SnowflakeError::BeforeEpoch);
    }

    #[test]
    fn sustained_overflow_is_bounded_by_max_lead() {
        let clock = ManualClock::at(T0);
        let ids = Snowflake::with_clock(0, clock, Duration::from_millis(2)).unwrap();
        // 3 ms worth of ids are allowed (now, now+1, now+2), then the generator refuses.
        for _ in 0..(3 * 4096) {
            ids.next_id().unwrap();
        }
        assert_eq!(
            ids.next_id().unwrap_err(),
            SnowflakeError::ClockBehind { lead_ms: 3 }
        );
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let ids = Arc::new(Snowflake::new(3).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let ids = Arc::clone(&ids);
                std::thread::spawn(move || {
                    (0..50_000)
                        .map(|_| ids.next_id().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for id in t.join().unwrap() {
                assert!(all.insert(id), "duplicate {id}");
            }
        }
        assert_eq!(all.len(), 200_000);
    }

    #[test]
    fn different_workers_never_collide() {
        let clock = ManualClock::at(T0);
        let a = Snowflake::with_clock(1, clock.clone(), Duration::from_secs(1)).unwrap();
        let b = Snowflake::with_clock(2, clock, Duration::from_secs(1)).unwrap();
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(a.next_id().unwrap()));
            assert!(seen.insert(b.next_id().unwrap()));
        }
    }
}
