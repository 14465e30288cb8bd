//! Entry point for agent: load the configuration, run the agent until SIGINT/SIGTERM or a
//! fatal close, and turn the outcome into an exit code.
//!
//! Usage: `agent [CONFIG_FILE]` (or `AGENT_CONFIG=CONFIG_FILE`); `AGENT_*` variables
//! override the file (see the `config` module). Logging follows `RUST_LOG` (default
//! `info`), `AGENT_LOG_FORMAT=json` for JSON lines; `OTEL_*` variables turn on trace export.
//!
//! Exit codes (sysexits.h): 0 after a requested shutdown, 78 bad configuration (including a
//! `metrics_listen` address that cannot be bound), 77 the gateway rejected the token, 76
//! another "do not reconnect" close, 74 outbox I/O error, 71 no runtime, 70 internal
//! failure.
//!
//! Upgrades (`agent::upgrade`): after an upgrade was installed the agent stops, and this
//! process becomes the watchdog of the new binary; it ends by exec'ing the new binary or
//! the restored previous one, so the process manager keeps watching one PID. A start that
//! finds an upgrade whose watchdog died resumes watching. 69 (EX_UNAVAILABLE): neither
//! binary could be exec'd.
//!
//! With `metrics_listen` (or `AGENT_METRICS_LISTEN`) set, Prometheus can scrape
//! `http://<metrics_listen>/metrics`; `/healthz` there answers `ok` while the process runs.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let path = std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("AGENT_CONFIG"))
        .map(PathBuf::from);
    let config = match agent::AgentConfig::load(path.as_deref(), |k| std::env::var(k).ok()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("agent: {e}");
            // EX_CONFIG
            return ExitCode::from(78);
        }
    };
    // Logs go to stderr (journald picks them up), coloured only on a terminal; spans go to
    // the OTLP endpoint named by the standard OTEL_* variables, if any.
    let log_format = std::env::var("AGENT_LOG_FORMAT").unwrap_or_default();
    let telemetry = servicekit::telemetry::TelemetryArgs::from_env().and_then(|args| {
        servicekit::telemetry::init(
            "agent",
            servicekit::telemetry::LogFormat::parse(&log_format),
            &args,
        )
    });
    let _telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agent: {e}");
            // EX_CONFIG
            return ExitCode::from(78);
        }
    };
    match agent::upgrade::boot(&config) {
        Ok(agent::upgrade::Boot::Run) => {}
        Ok(agent::upgrade::Boot::Watch) => return watch_upgrade(&config),
        // The agent still runs; the record is reported as unreadable at start.
        Err(e) => tracing::error!(error = %e, "Cannot read the upgrade record."),
    }
    // Two workers are plenty for one connection and a few tasks; the blocking pool serves
    // the outbox.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: cannot start the runtime: {e}");
            // EX_OSERR
            return ExitCode::from(71);
        }
    };
    let (code, restart) = runtime.block_on(async {
        tracing::info!(
            node = %config.node_id,
            gateways = config.gateways.len(),
            outbox = %config.outbox_path.display(),
            "Starting."
        );
        let mut handle = match agent::start(config.clone()).await {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "Cannot start.");
                return (ExitCode::from(e.exit_code()), false);
            }
        };
        let result = tokio::select! {
            r = handle.join() => r,
            () = servicekit::shutdown_signal() => {
                tracing::info!("Shutting down.");
                handle.stop();
                handle.join().await
            }
        };
        match result {
            Ok(()) => (ExitCode::SUCCESS, handle.restart_for_upgrade()),
            Err(e) => {
                tracing::error!(error = %e, "Stopped.");
                (ExitCode::from(e.exit_code()), false)
            }
        }
    });
    // The runtime (and with it the outbox and the metrics socket) is gone before the new
    // binary starts.
    drop(runtime);
    if restart {
        return watch_upgrade(&config);
    }
    code
}

/// Hands over to the installed upgrade; returns only when nothing could be exec'd.
fn watch_upgrade(config: &agent::AgentConfig) -> ExitCode {
    let e = agent::upgrade::hand_over(config);
    tracing::error!(error = %e, "Upgrade hand-over failed.");
    // EX_UNAVAILABLE
    ExitCode::from(69)
}
