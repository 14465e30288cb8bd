//! Entry point for scheduler; the service is not implemented yet.

fn main() -> std::process::ExitCode {
    eprintln!("scheduler: not implemented yet");
    std::process::ExitCode::from(70)
}
