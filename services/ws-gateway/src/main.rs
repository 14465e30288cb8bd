//! Entry point for ws-gateway; the service is not implemented yet.

fn main() -> std::process::ExitCode {
    eprintln!("ws-gateway: not implemented yet");
    std::process::ExitCode::from(70)
}
