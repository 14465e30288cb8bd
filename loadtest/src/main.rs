//! Load generator entry point; the scenarios arrive with the load-generator issue.

fn main() -> std::process::ExitCode {
    eprintln!("loadtest: not implemented yet");
    std::process::ExitCode::from(70)
}
