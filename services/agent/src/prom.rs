//! The agent's own Prometheus metrics: the counters and gauges the connection loop and the
//! executor update, and their rendering as Prometheus text exposition format (0.0.4).
//!
//! This module owns the metric names, their help texts and the text format; serving it
//! over HTTP is [`crate::metrics_http`]'s job. (Host CPU, memory and disk samples for
//! status reports are a different thing and live in [`crate::metrics`].)
//!
//! Every value is a relaxed atomic in one [`AgentMetrics`] shared by `Arc`: updates are a
//! single atomic add on the hot paths, and a scrape reads a near-consistent snapshot.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use messages::fleet::Outcome;

/// Every task outcome, in the order they are rendered.
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

/// The agent's counters and gauges. Create one per agent and share it by `Arc`.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    connected: AtomicU64,
    sessions: AtomicU64,
    reconnects: AtomicU64,
    tasks_started: AtomicU64,
    tasks_finished: [AtomicU64; 4],
    results_sent: AtomicU64,
    acks_received: AtomicU64,
    heartbeats_sent: AtomicU64,
    commands_refused: AtomicU64,
    credentials_renewed: AtomicU64,
}

impl AgentMetrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A session got its welcome: connected, and one more session.
    pub fn session_started(&self) {
        self.connected.store(1, Ordering::Relaxed);
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// The welcomed session ended.
    pub fn session_ended(&self) {
        self.connected.store(0, Ordering::Relaxed);
    }

    /// A session (or connection attempt) ended and another attempt will follow.
    pub fn reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// A task began to run.
    pub fn task_started(&self) {
        self.tasks_started.fetch_add(1, Ordering::Relaxed);
    }

    /// A task ended with `outcome`.
    pub fn task_finished(&self, outcome: Outcome) {
        if let Some(c) = self.tasks_finished.get(outcome_index(outcome)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A task result was written to a gateway (live or replayed).
    pub fn result_sent(&self) {
        self.results_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// An `agent.ack` push arrived.
    pub fn ack_received(&self) {
        self.acks_received.fetch_add(1, Ordering::Relaxed);
    }

    /// A heartbeat was written to a gateway.
    pub fn heartbeat_sent(&self) {
        self.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a welcomed session is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) != 0
    }

    /// Welcomed sessions so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// The metrics as Prometheus text exposition format (version 0.0.4). `outbox_entries`
    /// is the outbox's current length, or `None` to leave that gauge out (when the outbox
    /// could not be read).
    /// A command was refused (bad or missing signature, expired, replayed, another node's).
    pub fn command_refused(&self) {
        self.commands_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A renewed credential was stored.
    pub fn credential_renewed(&self) {
        self.credentials_renewed.fetch_add(1, Ordering::Relaxed);
    }

    /// Commands refused so far.
    pub fn commands_refused(&self) -> u64 {
        self.commands_refused.load(Ordering::Relaxed)
    }

    /// Credentials renewed so far.
    pub fn credentials_renewed(&self) -> u64 {
        self.credentials_renewed.load(Ordering::Relaxed)
    }

    pub fn render(&self, outbox_entries: Option<u64>) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "agent_connected",
            "gauge",
            "Whether a gateway session is established (welcomed): 1 or 0.",
            get(&self.connected),
        );
        metric(
            "agent_sessions_total",
            "counter",
            "Gateway sessions that got a welcome.",
            get(&self.sessions),
        );
        metric(
            "agent_reconnects_total",
            "counter",
            "Sessions or connection attempts that ended and were followed by a retry.",
            get(&self.reconnects),
        );
        metric(
            "agent_commands_refused_total",
            "counter",
            "Pushes refused: unsigned, mis-signed, expired, replayed or for another node.",
            get(&self.commands_refused),
        );
        metric(
            "agent_credentials_renewed_total",
            "counter",
            "Renewed credentials received and stored.",
            get(&self.credentials_renewed),
        );
        metric(
            "agent_tasks_started_total",
            "counter",
            "Tasks that began to run.",
            get(&self.tasks_started),
        );
        metric(
            "agent_results_sent_total",
            "counter",
            "Task results written to a gateway, live or replayed from the outbox.",
            get(&self.results_sent),
        );
        metric(
            "agent_acks_received_total",
            "counter",
            "agent.ack pushes received (each deletes acknowledged outbox entries).",
            get(&self.acks_received),
        );
        metric(
            "agent_heartbeats_sent_total",
            "counter",
            "Heartbeats written to a gateway.",
            get(&self.heartbeats_sent),
        );
        if let Some(entries) = outbox_entries {
            metric(
                "agent_outbox_entries",
                "gauge",
                "Reports and results in the outbox waiting for an ack.",
                entries,
            );
        }
        header(
            &mut out,
            "agent_tasks_finished_total",
            "counter",
            "Tasks that ended, by outcome.",
        );
        for outcome in OUTCOMES {
            let value = self
                .tasks_finished
                .get(outcome_index(outcome))
                .map_or(0, get);
            let _ = writeln!(
                out,
                "agent_tasks_finished_total{{outcome=\"{}\"}} {value}",
                outcome_label(outcome)
            );
        }
        out
    }
}

/// Writes the `# HELP` and `# TYPE` lines of one metric family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
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
    fn renders_every_family_with_help_and_type() {
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
        let text = m.render(Some(7));
        assert_eq!(value(&text, "agent_connected"), Some(1));
        assert_eq!(value(&text, "agent_sessions_total"), Some(3));
        assert_eq!(value(&text, "agent_reconnects_total"), Some(1));
        assert_eq!(value(&text, "agent_tasks_started_total"), Some(1));
        assert_eq!(value(&text, "agent_results_sent_total"), Some(1));
        assert_eq!(value(&text, "agent_acks_received_total"), Some(1));
        assert_eq!(value(&text, "agent_heartbeats_sent_total"), Some(1));
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
        // Every family has exactly one HELP and one TYPE line, and every line ends with a
        // newline (the format requires the last one too).
        for name in [
            "agent_connected",
            "agent_sessions_total",
            "agent_tasks_finished_total",
            "agent_outbox_entries",
        ] {
            assert_eq!(
                text.matches(&format!("# HELP {name} ")).count(),
                1,
                "{text}"
            );
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{text}"
            );
        }
        assert!(text.ends_with('\n'));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn an_unreadable_outbox_leaves_its_gauge_out() {
        let text = AgentMetrics::new().render(None);
        assert!(!text.contains("agent_outbox_entries"), "{text}");
        assert_eq!(value(&text, "agent_connected"), Some(0));
    }
}
