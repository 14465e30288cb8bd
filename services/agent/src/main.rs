//! Entry point for agent. For now it loads and validates the configuration and exits: the
//! connection loop is not implemented yet.
//!
//! Usage: `agent [CONFIG_FILE]` (or `AGENT_CONFIG=CONFIG_FILE`); `AGENT_*` variables
//! override the file (see the `config` module).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let path = std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("AGENT_CONFIG"))
        .map(PathBuf::from);
    match agent::AgentConfig::load(path.as_deref(), |k| std::env::var(k).ok()) {
        Ok(config) => {
            eprintln!(
                "agent: configuration ok (node {}, {} gateway(s), outbox {}); \
                 the connection loop is not implemented yet",
                config.node_id,
                config.gateways.len(),
                config.outbox_path.display()
            );
            // EX_SOFTWARE, as the other not-yet-implemented services use.
            ExitCode::from(70)
        }
        Err(e) => {
            eprintln!("agent: {e}");
            // EX_CONFIG
            ExitCode::from(78)
        }
    }
}
