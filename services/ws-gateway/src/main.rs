//! ws-gateway binary: parse flags, initialise logging, bind, run until SIGTERM/SIGINT.

use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use ws_gateway::{Args, Config};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(user) = &args.mint_token {
        return mint_token(&args, user);
    }
    let _telemetry =
        match servicekit::telemetry::init_main("ws-gateway", &args.log_format, &args.telemetry) {
            Ok(t) => t,
            Err(code) => return code,
        };
    let config = match Config::from_args(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ws-gateway: {e}");
            return ExitCode::from(64);
        }
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ws-gateway: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(71);
        }
    };
    tracing::info!(listen = %args.listen, nats = %servicekit::nats::NatsTarget::parse(&config.nats_url).map(|t| t.redacted()).unwrap_or_default(), "Starting.");
    let result = actix_web::rt::System::new().block_on(ws_gateway::run(
        config,
        listener,
        servicekit::shutdown_signal(),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ws-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--mint-token USER`: prints a token for trying the gateway out.
fn mint_token(args: &Args, user: &str) -> ExitCode {
    let result = (|| -> Result<String, Box<dyn std::error::Error>> {
        let secret = args
            .jwt_hs256_secret
            .as_deref()
            .ok_or("--mint-token needs the HS256 secret")?;
        let user = messages::UserId::new(user)?;
        let kind: messages::ClientKind = args.mint_kind.parse()?;
        if kind == messages::ClientKind::Agent {
            return Err(
                "agent tokens are signed with the agent-token key, not the app secret: \
                        use `scheduler agent-token` (see docs/security.md)"
                    .into(),
            );
        }
        let rooms = args
            .mint_rooms
            .split(',')
            .filter(|r| !r.is_empty())
            .map(messages::RoomId::new)
            .collect::<Result<Vec<_>, _>>()?;
        let ttl = std::time::Duration::from_secs(24 * 3600);
        Ok(ws_gateway::auth::mint(
            secret.as_bytes(),
            &user,
            kind,
            &rooms,
            ttl,
        )?)
    })();
    match result {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ws-gateway: {e}");
            ExitCode::from(64)
        }
    }
}
