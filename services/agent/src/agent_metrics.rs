//! The agent's own Prometheus metrics: the counters and gauges the connection loop and the
//! executor update, registered with `prometheus-client` as in every other service, under
//! the `agent` prefix. Serving them is `servicekit::metrics_server`'s job (host CPU, memory
//! and disk samples for status reports are a different thing, in [`crate::metrics`]).
//!
//! Handles to every series are resolved at start-up, so an update on a hot path is one
//! atomic add.

use messages::fleet::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every task outcome, in the order of [`outcome_index`].
const OUTCOMES: [Outcome; 4] = [
    Outcome::Succeeded,
    Outcome::Failed,
    Outcome::TimedOut,
    Outcome::Cancelled,
];

/// The `outcome` label value of a task outcome (the wire spelling).
fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Cancelled => "cancelled",
    }
}

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Succeeded => 0,
        Outcome::Failed => 1,
        Outcome::TimedOut => 2,
        Outcome::Cancelled => 3,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The agent's counters and gauges. Create one per agent and share it by `Arc`.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    connected: Gauge,
    sessions: Counter,
    reconnects: Counter,
    tasks_started: Counter,
    tasks_finished: [Counter; 4],
    results_sent: Counter,
    acks_received: Counter,
    heartbeats_sent: Counter,
    commands_refused: Counter,
    credentials_renewed: Counter,
    /// The latest heartbeat round trips (beat written -> gateway's ack read), newest last,
    /// and how many were ever measured.
    heartbeat_rtts: std::sync::Mutex<(u64, std::collections::VecDeque<std::time::Duration>)>,
}

/// Heartbeat round trips kept for [`AgentMetrics::heartbeat_rtts`].
const KEPT_RTTS: usize = 256;

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agent");
        let connected = Gauge::default();
        registry.register(
            "connected",
            "Whether a gateway session is established (welcomed): 1 or 0.",
            connected.clone(),
        );
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let sessions = counter("sessions", "Gateway sessions that got a welcome.");
        let reconnects = counter(
            "reconnects",
            "Sessions or connection attempts that ended and were followed by a retry.",
        );
        let commands_refused = counter(
            "commands_refused",
            "Pushes refused: unsigned, mis-signed, expired, replayed or for another node.",
        );
        let credentials_renewed = counter(
            "credentials_renewed",
            "Renewed credentials received and stored.",
        );
        let tasks_started = counter("tasks_started", "Tasks that began to run.");
        let results_sent = counter(
            "results_sent",
            "Task results written to a gateway, live or replayed from the outbox.",
        );
        let acks_received = counter(
            "acks_received",
            "agent.ack pushes received (each deletes acknowledged outbox entries).",
        );
        let heartbeats_sent = counter("heartbeats_sent", "Heartbeats written to a gateway.");
        let finished = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "tasks_finished",
            "Tasks that ended, by outcome.",
            finished.clone(),
        );
        // Every outcome is resolved now, so all four series are exported from the start.
        let tasks_finished = OUTCOMES.map(|o| {
            finished
                .get_or_create(&OutcomeLabel {
                    outcome: outcome_label(o),
                })
                .clone()
        });
        AgentMetrics {
            registry,
            connected,
            sessions,
            reconnects,
            tasks_started,
            tasks_finished,
            results_sent,
            acks_received,
            heartbeats_sent,
            commands_refused,
            credentials_renewed,
            heartbeat_rtts: std::sync::Mutex::new((0, std::collections::VecDeque::new())),
        }
    }

    /// A heartbeat's ack arrived `rtt` after the beat was written.
    pub fn heartbeat_rtt(&self, rtt: std::time::Duration) {
        if let Ok(mut kept) = self.heartbeat_rtts.lock() {
            let (count, rtts) = &mut *kept;
            if rtts.len() >= KEPT_RTTS {
                rtts.pop_front();
            }
            rtts.push_back(rtt);
            *count += 1;
        }
    }

    /// The latest heartbeat round trips (at most 256), oldest first: what tunnel traffic on
    /// the same connection does to the beats is read from these (docs/benchmarks.md).
    pub fn heartbeat_rtts(&self) -> Vec<std::time::Duration> {
        self.heartbeat_rtts
            .lock()
            .map(|r| r.1.iter().copied().collect())
            .unwrap_or_default()
    }

    /// How many heartbeat round trips were measured since start: with
    /// [`AgentMetrics::heartbeat_rtts`], the beats of a time window.
    pub fn heartbeat_rtt_count(&self) -> u64 {
        self.heartbeat_rtts.lock().map(|r| r.0).unwrap_or_default()
    }

    /// A session got its welcome: connected, and one more session.
    pub fn session_started(&self) {
        self.connected.set(1);
        self.sessions.inc();
    }

    /// The welcomed session ended.
    pub fn session_ended(&self) {
        self.connected.set(0);
    }

    /// A session (or connection attempt) ended and another attempt will follow.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// A task began to run.
    pub fn task_started(&self) {
        self.tasks_started.inc();
    }

    /// A task ended with `outcome`.
    pub fn task_finished(&self, outcome: Outcome) {
        if let Some(c) = self.tasks_finished.get(outcome_index(outcome)) {
            c.inc();
        }
    }

    /// A task result was written to a gateway (live or replayed).
    pub fn result_sent(&self) {
        self.results_sent.inc();
    }

    /// An `agent.ack` push arrived.
    pub fn ack_received(&self) {
        self.acks_received.inc();
    }

    /// A heartbeat was written to a gateway.
    pub fn heartbeat_sent(&self) {
        self.heartbeats_sent.inc();
    }

    /// A command was refused (bad or missing signature, expired, replayed, another node's).
    pub fn command_refused(&self) {
        self.commands_refused.inc();
    }

    /// A renewed credential was stored.
    pub fn credential_renewed(&self) {
        self.credentials_renewed.inc();
    }

    /// Whether a welcomed session is up.
    pub fn connected(&self) -> bool {
        self.connected.get() != 0
    }

    /// Welcomed sessions so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.get()
    }

    /// Commands refused so far.
    pub fn commands_refused(&self) -> u64 {
        self.commands_refused.get()
    }

    /// Credentials renewed so far.
    pub fn credentials_renewed(&self) -> u64 {
        self.credentials_renewed.get()
    }

    /// The metrics as OpenMetrics text. `outbox_entries` is the outbox's current length,
    /// or `None` to leave that gauge out (when the outbox could not be read) rather than
    /// report a made-up value.
    pub fn encode(&self, outbox_entries: Option<u64>) -> String {
        let mut out = String::with_capacity(2048);
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(entries) = outbox_entries {
            let mut outbox = Registry::with_prefix("agent");
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(entries).unwrap_or(i64::MAX));
            outbox.register(
                "outbox_entries",
                "Reports and results in the outbox waiting for an ack.",
                gauge,
            );
            let _ = encode_registry(&mut out, &outbox);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name plus labels) in `text`.
    fn value(text: &str, series: &str) -> Option<u64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn encodes_every_family_under_its_name() {
        let m = AgentMetrics::new();
        m.session_started();
        m.session_started();
        m.session_ended();
        m.session_started();
        m.reconnect();
        m.task_started();
        m.task_finished(Outcome::Succeeded);
        m.task_finished(Outcome::TimedOut);
        m.task_finished(Outcome::TimedOut);
        m.result_sent();
        m.ack_received();
        m.heartbeat_sent();
        let text = m.encode(Some(7));
        assert_eq!(value(&text, "agent_connected"), Some(1));
        assert_eq!(value(&text, "agent_sessions_total"), Some(3));
        assert_eq!(value(&text, "agent_reconnects_total"), Some(1));
        assert_eq!(value(&text, "agent_tasks_started_total"), Some(1));
        assert_eq!(value(&text, "agent_results_sent_total"), Some(1));
        assert_eq!(value(&text, "agent_acks_received_total"), Some(1));
        assert_eq!(value(&text, "agent_heartbeats_sent_total"), Some(1));
        assert_eq!(value(&text, "agent_commands_refused_total"), Some(0));
        assert_eq!(value(&text, "agent_credentials_renewed_total"), Some(0));
        assert_eq!(value(&text, "agent_outbox_entries"), Some(7));
        let finished = |o: &str| {
            value(
                &text,
                &format!("agent_tasks_finished_total{{outcome=\"{o}\"}}"),
            )
        };
        assert_eq!(finished("succeeded"), Some(1));
        assert_eq!(finished("timed_out"), Some(2));
        assert_eq!(finished("failed"), Some(0));
        assert_eq!(finished("cancelled"), Some(0));
        assert!(text.contains("# TYPE agent_connected gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE agent_tasks_finished counter\n"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn an_unreadable_outbox_leaves_its_gauge_out() {
        let text = AgentMetrics::new().encode(None);
        assert!(!text.contains("agent_outbox_entries"), "{text}");
        assert_eq!(value(&text, "agent_connected"), Some(0));
    }
}
