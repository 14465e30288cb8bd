//! The configuration file test agents start from, built in one place: the node's test
//! token, the test command-signing key written beside the file, an outbox per node, and a
//! quick reconnect backoff, plus whatever a test adds (gateways, allowed commands, labels,
//! TLS or relay settings). It renders TOML text, so this crate needs no dependency on the
//! agent; tests parse it with `agent::AgentConfig::from_toml` or hand the file to a process.

use std::fmt::Write as _;
use std::path::Path;

use crate::ws::{TEST_COMMAND_PUBLIC, token};

/// An agent configuration under construction; see the module documentation.
#[derive(Debug, Clone)]
pub struct AgentToml {
    node: String,
    credential: String,
    gateways: Vec<String>,
    outbox: String,
    lines: Vec<String>,
    labels: Vec<(String, String)>,
}

impl AgentToml {
    /// `node` with a valid one-hour agent token, no gateways yet and `<node>.redb` as its
    /// outbox.
    pub fn new(node: &str) -> Self {
        AgentToml {
            node: node.to_owned(),
            credential: format!("token = \"{}\"", token(node, Some("agent"), &[])),
            gateways: Vec::new(),
            outbox: format!("{node}.redb"),
            lines: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Adds a gateway URL (`ws://…/ws`, `wss://…`, with `?via=` for a relay).
    pub fn gateway(mut self, url: impl Into<String>) -> Self {
        self.gateways.push(url.into());
        self
    }

    /// Adds gateway URLs in order.
    pub fn gateways<S: AsRef<str>>(mut self, urls: &[S]) -> Self {
        self.gateways
            .extend(urls.iter().map(|u| u.as_ref().to_owned()));
        self
    }

    /// Reads the token from `file` (relative to the configuration file) instead.
    pub fn token_file(mut self, file: &str) -> Self {
        self.credential = format!("token_file = \"{file}\"");
        self
    }

    /// The outbox file (relative to the configuration file).
    pub fn outbox(mut self, path: &str) -> Self {
        self.outbox = path.to_owned();
        self
    }

    /// Adds top-level TOML (one or more `key = value` lines; no tables).
    pub fn line(mut self, line: impl Into<String>) -> Self {
        self.lines.push(line.into());
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The TOML text.
    pub fn text(&self) -> String {
        let gateways = self
            .gateways
            .iter()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = format!(
            "node_id = \"{}\"\n{}\ngateways = [{gateways}]\noutbox_path = \"{}\"\ncommand_keys_file = \"command.pub\"\n",
            self.node, self.credential, self.outbox
        );
        for line in &self.lines {
            let _ = writeln!(text, "{line}");
        }
        if !self.labels.is_empty() {
            text.push_str("\n[labels]\n");
            for (k, v) in &self.labels {
                let _ = writeln!(text, "{k} = \"{v}\"");
            }
        }
        text.push_str("\n[backoff]\nbase_ms = 50\ncap_ms = 500\njitter = 0.3\n");
        text
    }

    /// Writes the command-signing key the file names into `dir` and returns the text.
    pub fn render(&self, dir: &Path) -> String {
        if let Err(e) = std::fs::write(dir.join("command.pub"), TEST_COMMAND_PUBLIC) {
            panic!("cannot write command.pub into {}: {e}", dir.display());
        }
        self.text()
    }
}
