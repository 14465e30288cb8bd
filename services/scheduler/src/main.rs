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
    if let Some(dir) = &args.keygen {
        return keygen(dir);
    }
    if let Some(node) = &args.mint_agent_token {
        return mint_agent_token(&args, node);
    }
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

/// `--keygen DIR`: a command key and an agent-token key, private halves readable by the
/// owner only.
fn keygen(dir: &std::path::Path) -> ExitCode {
    match scheduler::trust::keygen(dir) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("scheduler: keygen: {e}");
            ExitCode::from(73)
        }
    }
}

/// `--mint-agent-token NODE`: enrols an agent.
fn mint_agent_token(args: &Args, node: &str) -> ExitCode {
    let result = (|| -> Result<String, Box<dyn std::error::Error>> {
        let path = args
            .agent_token_key_file
            .as_ref()
            .ok_or("--mint-agent-token needs SCHEDULER_AGENT_TOKEN_KEY_FILE")?;
        let ttl = std::time::Duration::from_secs(args.token_ttl_secs);
        let tokens =
            scheduler::trust::AgentTokens::from_pem(&scheduler::trust::read_pem(path)?, ttl)?;
        let node = messages::UserId::new(node)?;
        let now = servicekit::clock::now_secs();
        Ok(tokens.mint(&node, now, ttl)?.0)
    })();
    match result {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("scheduler: {e}");
            ExitCode::from(64)
        }
    }
}
