//! Entry point for ws-api; the service is not implemented yet.

fn main() -> std::process::ExitCode {
    eprintln!("ws-api: not implemented yet");
    std::process::ExitCode::from(70)
}
