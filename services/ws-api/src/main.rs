//! ws-api binary: parse flags, initialise logging, bind, run until SIGTERM/SIGINT.

use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use ws_api::{Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    servicekit::init_tracing(&args.log_format);
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
    tracing::info!(listen = %args.listen, nats = %config.nats_url, "Starting.");
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
