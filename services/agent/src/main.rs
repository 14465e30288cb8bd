//! Entry point for agent; the service is not implemented yet.

fn main() -> std::process::ExitCode {
    eprintln!("agent: not implemented yet");
    std::process::ExitCode::from(70)
}
