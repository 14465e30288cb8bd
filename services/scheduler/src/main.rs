//! scheduler binary: parse flags, initialise logging, bind, run until SIGTERM/SIGINT.
//! Exit codes: 64 bad configuration, 71 cannot listen, 1 failure while running, including
//! the loss of the leader lease while active (the supervisor restarts the process, which
//! then stands by until the lease is free).

use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use scheduler::{Args, Config};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        // --help and --version.
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let _telemetry =
        match servicekit::telemetry::init_main("scheduler", &args.log_format, &args.telemetry) {
            Ok(t) => t,
            Err(code) => return code,
        };
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("scheduler: {e}");
            return ExitCode::from(64);
        }
    };
    if scheduler::auth::has_unnamed(&args.api_keys) {
        tracing::warn!(
            "SCHEDULER_API_KEYS has bare secrets: they are operator keys named key1, key2, ... \
             by position; name them (name:operator:secret or name:read:secret) so the audit \
             log says who acted."
        );
    }
    let keys: Vec<String> = config
        .api_keys
        .iter()
        .map(|k| format!("{}({})", k.name(), k.scope().as_str()))
        .collect();
    tracing::info!(keys = %keys.join(","), "API keys loaded.");
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("scheduler: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(71);
        }
    };
    tracing::info!(listen = %args.listen, nats = %servicekit::nats::NatsTarget::parse(&config.nats_url).map(|t| t.redacted()).unwrap_or_default(), db = %config.db_path.display(), "Starting.");
    match actix_web::rt::System::new().block_on(scheduler::run(
        config,
        listener,
        servicekit::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scheduler: {e}");
            ExitCode::FAILURE
        }
    }
}
