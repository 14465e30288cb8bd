//! ws-api binary: parse flags, initialise logging, bind, run until SIGTERM/SIGINT.

use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use ws_api::{Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry =
        match servicekit::telemetry::init_main("ws-api", &args.log_format, &args.telemetry) {
            Ok(t) => t,
            Err(code) => return code,
        };
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ws-api: {e}");
            return ExitCode::from(64);
        }
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ws-api: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(71);
        }
    };
    tracing::info!(listen = %args.listen, nats = %servicekit::nats::NatsTarget::parse(&config.nats_url).map(|t| t.redacted()).unwrap_or_default(), "Starting.");
    match actix_web::rt::System::new().block_on(ws_api::run(
        config,
        listener,
        servicekit::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws-api: {e}");
            ExitCode::FAILURE
        }
    }
}
