//! The gateway tier as the operator console shows it: the latest
//! [`GatewayStats`](messages::payload::GatewayStats) each ws-gateway replica published on
//! `ws.stats.<instance>`, kept in memory with the one before it (for rates) and forgotten
//! once a replica has been silent for [`silent_after`] of its own periods. Nothing here is
//! durable: after a restart the view fills again within one period.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use messages::GatewayId;
use messages::payload::{self, GatewayStats};

/// Most replicas remembered: a bound against a flood of made-up instance ids.
pub(crate) const MAX_REPLICAS: usize = 1024;

/// Shortest silence after which a replica is forgotten, whatever its period.
const MIN_SILENCE: Duration = Duration::from_secs(15);

/// How long a replica that publishes every `interval_ms` may be silent before it is
/// forgotten: three periods, at least [`MIN_SILENCE`].
pub(crate) fn silent_after(interval_ms: u64) -> Duration {
    Duration::from_millis(interval_ms.saturating_mul(3)).max(MIN_SILENCE)
}

/// One replica as last heard from.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// The latest envelope.
    pub stats: GatewayStats,
    /// How long ago it arrived.
    pub age: Duration,
    /// Pushes delivered per second between the last two envelopes, if there were two.
    pub push_rate: Option<f64>,
    /// Client messages published per second between the last two envelopes.
    pub publish_rate: Option<f64>,
}

#[derive(Debug)]
struct Seen {
    stats: GatewayStats,
    at: Instant,
    previous: Option<(GatewayStats, Instant)>,
}

/// The replicas heard from, by instance id.
#[derive(Debug, Default)]
pub struct Tier {
    replicas: Mutex<BTreeMap<GatewayId, Seen>>,
}

impl Tier {
    /// Takes one envelope (arrived now).
    pub fn record(&self, stats: GatewayStats) {
        self.record_at(stats, Instant::now());
    }

    fn record_at(&self, stats: GatewayStats, at: Instant) {
        let Ok(mut map) = self.replicas.lock() else {
            return;
        };
        Self::expire(&mut map, at);
        if let Some(seen) = map.get_mut(&stats.instance) {
            let old = std::mem::replace(&mut seen.stats, stats);
            seen.previous = Some((old, seen.at));
            seen.at = at;
        } else if map.len() < MAX_REPLICAS {
            map.insert(
                stats.instance.clone(),
                Seen {
                    stats,
                    at,
                    previous: None,
                },
            );
        }
    }

    fn expire(map: &mut BTreeMap<GatewayId, Seen>, now: Instant) {
        map.retain(|_, s| now.duration_since(s.at) < silent_after(s.stats.interval_ms));
    }

    /// The replicas heard from recently, by instance id.
    pub fn replicas(&self) -> Vec<Replica> {
        self.replicas_at(Instant::now())
    }

    fn replicas_at(&self, now: Instant) -> Vec<Replica> {
        let Ok(mut map) = self.replicas.lock() else {
            return Vec::new();
        };
        Self::expire(&mut map, now);
        map.values()
            .map(|s| {
                let rate = |f: fn(&GatewayStats) -> u64| {
                    let (prev, at) = s.previous.as_ref()?;
                    let secs = s.at.duration_since(*at).as_secs_f64();
                    // A restart resets the counters: no rate across it.
                    let delta = f(&s.stats).checked_sub(f(prev))?;
                    (secs > 0.0).then(|| delta as f64 / secs)
                };
                Replica {
                    stats: s.stats.clone(),
                    age: now.duration_since(s.at),
                    push_rate: rate(|g| g.pushes_delivered),
                    publish_rate: rate(|g| g.published),
                }
            })
            .collect()
    }
}

/// Consumes `ws.stats.*` into `shared.gateways` until the subscription ends. Envelopes that
/// do not parse are dropped: they change nothing the console shows.
pub(crate) async fn consume(
    shared: std::sync::Weak<crate::Shared>,
    mut sub: async_nats::Subscriber,
) {
    while let Some(msg) = sub.next().await {
        let Some(shared) = shared.upgrade() else {
            break;
        };
        match payload::from_bus::<GatewayStats>(&msg.payload) {
            Ok(stats) => shared.gateways.record(stats),
            Err(e) => tracing::debug!(subject = %msg.subject, error = %e, "Bad gateway stats."),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stats(name: &str, pushes: u64) -> GatewayStats {
        GatewayStats {
            instance: GatewayId::new(name).unwrap(),
            ready: true,
            worker_id: Some(1),
            app_connections: 2,
            agent_connections: 1,
            slow_consumer_closes: 0,
            pushes_delivered: pushes,
            published: 0,
            interval_ms: 1_000,
            sent_at_ms: 0,
        }
    }

    #[test]
    fn rates_come_from_two_envelopes_and_silent_replicas_are_forgotten() {
        let tier = Tier::default();
        let t0 = Instant::now();
        tier.record_at(stats("gw-1", 100), t0);
        tier.record_at(stats("gw-2", 5), t0);
        let first = tier.replicas_at(t0);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].push_rate, None);
        tier.record_at(stats("gw-1", 300), t0 + Duration::from_secs(2));
        let r = tier.replicas_at(t0 + Duration::from_secs(2));
        assert_eq!(r[0].push_rate, Some(100.0));
        // A restart (counter went down) gives no rate rather than a huge one.
        tier.record_at(stats("gw-1", 3), t0 + Duration::from_secs(3));
        assert_eq!(
            tier.replicas_at(t0 + Duration::from_secs(3))[0].push_rate,
            None
        );
        // gw-2 fell silent for longer than 15 s; gw-1 did not.
        let later = tier.replicas_at(t0 + Duration::from_secs(16));
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].stats.instance.as_str(), "gw-1");
    }
}
