//! `otlp-sink`: an OTLP/HTTP trace receiver that counts what it gets, for measuring
//! the cost of tracing without a Jaeger at hand. Prints its endpoint, then on SIGINT or
//! SIGTERM the number of export requests and spans received.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let receiver = match testkit::otlp::Receiver::start_counting().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("otlp-sink: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", receiver.endpoint());
    servicekit::shutdown_signal().await;
    println!(
        "requests={} spans={}",
        receiver.requests(),
        receiver.span_count()
    );
    ExitCode::SUCCESS
}
