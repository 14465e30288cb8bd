//! Per-hop latency from the `ws-hop` header stamps a message collects on its way (gateway
//! in, gateway publish, service in, service publish, gateway receive, ...). Every service
//! that ends a leg of the journey records the legs it can see, under the same metric name
//! and labels, so one Prometheus query shows the whole path whichever service measured it.

use async_nats::HeaderMap;
use messages::headers;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set: the two consecutive hops a latency lies between.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Hop {
    from: String,
    to: String,
}

fn histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// The `hop_latency_seconds` histogram family. Clones share the same data.
#[derive(Debug, Clone)]
pub struct HopLatency {
    family: Family<Hop, Histogram>,
}

impl Default for HopLatency {
    fn default() -> Self {
        HopLatency {
            family: Family::<Hop, Histogram>::new_with_constructor(histogram as fn() -> Histogram),
        }
    }
}

impl HopLatency {
    /// Registers `hop_latency_seconds` in `registry` (under its prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let hops = HopLatency::default();
        hops.register_in(registry);
        hops
    }

    /// Registers this family (shared, not copied) in `registry`.
    pub fn register_in(&self, registry: &mut Registry) {
        registry.register(
            "hop_latency_seconds",
            "Latency between consecutive hops of a message, from ws-hop header stamps",
            self.family.clone(),
        );
    }

    /// Records the latency between two stamps (Unix micros); a clock step backwards counts
    /// as zero.
    pub fn observe(&self, from: &str, to: &str, from_us: u64, to_us: u64) {
        let seconds = to_us.saturating_sub(from_us) as f64 / 1e6;
        self.family
            .get_or_create(&Hop {
                from: from.into(),
                to: to.into(),
            })
            .observe(seconds);
    }

    /// Records every leg stamped in `map`, and the last stamp to `arrived` at `now_us`.
    pub fn record(&self, map: &HeaderMap, arrived: &str, now_us: u64) {
        let hops = headers::hops(map);
        for pair in hops.windows(2) {
            self.observe(&pair[0].0, &pair[1].0, pair[0].1, pair[1].1);
        }
        if let Some((last, at)) = hops.last() {
            self.observe(last, arrived, *at, now_us);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leg_and_the_arrival_are_recorded() {
        let mut registry = Registry::with_prefix("t");
        let hops = HopLatency::register(&mut registry);
        let mut map = HeaderMap::new();
        headers::stamp_hop(&mut map, headers::hop::GATEWAY_IN, 1_000);
        headers::stamp_hop(&mut map, headers::hop::GATEWAY_PUB, 1_500);
        hops.record(&map, headers::hop::SERVICE_IN, 3_500);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap_or_default();
        assert!(
            out.contains(r#"t_hop_latency_seconds_count{from="gw-in",to="gw-pub"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"t_hop_latency_seconds_count{from="gw-pub",to="svc-in"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"t_hop_latency_seconds_sum{from="gw-pub",to="svc-in"} 0.002"#),
            "{out}"
        );
    }
}
