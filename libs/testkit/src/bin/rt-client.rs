//! `rt-client`: a WebSocket client for trying the system by hand. Connects as a user to one
//! of the gateways, heartbeats, prints every push it gets, and when its gateway goes away
//! (reconnect frame, close or error) connects to the next one in the list, saying so.
//!
//! ```text
//! rt-client --gateways ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws --user alice \
//!   --secret HS256_SECRET [--pushes N] [--secs N]
//! ```
//! The token is signed here with the gateway's HS256 secret (`--secret` or
//! `RT_CLIENT_SECRET`); `--token` (or `RT_CLIENT_TOKEN`) uses a token you have instead.
//! Exits after `--pushes` pushes or `--secs` seconds, if given; otherwise runs until
//! Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use messages::{BodyCodec, Frame, FrameKind, payload};
use serde_json::json;
use testkit::ws::{Received, TestClient};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: rt-client --gateways URL[,URL...] --user USER \
(--secret HS256_SECRET | --token TOKEN) [--pushes N] [--secs N]";

#[derive(Debug)]
struct Options {
    gateways: Vec<String>,
    token: String,
    pushes: Option<u64>,
    secs: Option<u64>,
}

fn parse_args() -> Result<Options, BoxError> {
    let mut args = std::env::args().skip(1);
    let mut gateways = None;
    let mut user = None;
    let mut secret = std::env::var("RT_CLIENT_SECRET").ok();
    let mut token = std::env::var("RT_CLIENT_TOKEN").ok();
    let mut pushes = None;
    let mut secs = None;
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--gateways" => gateways = Some(value),
            "--user" => user = Some(value),
            "--secret" => secret = Some(value),
            "--token" => token = Some(value),
            "--pushes" => pushes = Some(value.parse()?),
            "--secs" => secs = Some(value.parse()?),
            other => return Err(format!("unknown flag {other}\n{USAGE}").into()),
        }
    }
    let gateways: Vec<String> = gateways
        .ok_or_else(|| format!("--gateways is required\n{USAGE}"))?
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let token = match (token.filter(|t| !t.is_empty()), user, secret) {
        (Some(token), _, _) => token,
        (None, Some(user), Some(secret)) => sign(&secret, &user)?,
        _ => return Err(format!("need --user with --secret, or --token\n{USAGE}").into()),
    };
    Ok(Options {
        gateways,
        token,
        pushes,
        secs,
    })
}

fn sign(secret: &str, user: &str) -> Result<String, BoxError> {
    let exp = servicekit::clock::now_secs() + 24 * 3600;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": exp, "kind": "app"}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

async fn resolve(url: &str) -> Result<SocketAddr, BoxError> {
    Ok(testkit::http::resolve(url).await?)
}

fn show(frame: &Frame) -> String {
    match frame.flags.codec() {
        BodyCodec::Json | BodyCodec::Raw => String::from_utf8_lossy(&frame.body).into_owned(),
        BodyCodec::MsgPack => format!("msgpack {:02x?}", &frame.body[..]),
    }
}

async fn run(opts: Options) -> Result<(), BoxError> {
    let mut addrs = Vec::new();
    for g in &opts.gateways {
        addrs.push((g.clone(), resolve(g).await?));
    }
    if addrs.is_empty() {
        return Err(USAGE.into());
    }
    let deadline = opts.secs.map(|s| Instant::now() + Duration::from_secs(s));
    let out_of_time = || deadline.is_some_and(|d| Instant::now() >= d);
    let mut got = 0u64;
    let mut next = 0usize;
    loop {
        let mut connected = None;
        for attempt in 0..addrs.len() * 50 {
            if out_of_time() {
                return Ok(());
            }
            let (url, addr) = &addrs[(next + attempt) % addrs.len()];
            match TestClient::connect(*addr, &opts.token).await {
                Ok(c) => {
                    connected = Some(((next + attempt) % addrs.len(), url.clone(), c));
                    break;
                }
                Err(e) => {
                    println!("cannot connect to {url}: {e:?}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        let Some((index, url, mut ws)) = connected else {
            return Err("no gateway accepts the connection".into());
        };
        println!(
            "connected to {url} (gateway {}, user {}, socket {})",
            ws.welcome.gateway, ws.welcome.user_id, ws.welcome.socket_id
        );
        let beat = Duration::from_millis(u64::from(ws.welcome.heartbeat.base_ms.max(200)) / 2);
        let mut next_beat = Instant::now() + beat;
        let mut beat_id = 0u64;
        loop {
            if out_of_time() {
                ws.close().await;
                return Ok(());
            }
            let wait = next_beat
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500));
            match ws.recv_within(wait).await {
                Received::Timeout => {
                    if Instant::now() >= next_beat {
                        beat_id += 1;
                        ws.send(&Frame::new(FrameKind::Heartbeat).with_msg_id(beat_id))
                            .await;
                        next_beat = Instant::now() + beat;
                    }
                }
                Received::Frame(f) if f.kind == FrameKind::Push => {
                    got += 1;
                    println!("push route={:?} body={}", f.route.as_str(), show(&f));
                    if opts.pushes.is_some_and(|n| got >= n) {
                        ws.close().await;
                        return Ok(());
                    }
                }
                Received::Frame(f) if f.kind == FrameKind::Reconnect => {
                    let why = payload::decode_body::<payload::Reconnect>(f.flags.codec(), &f.body)
                        .map_or_else(
                            |_| show(&f),
                            |r| format!("{}, after {} ms", r.reason, r.delay_ms),
                        );
                    println!("gateway asked to reconnect ({why}); moving");
                    break;
                }
                Received::Frame(_) => {}
                Received::Close(code) => {
                    println!("closed by the gateway ({code:?}); reconnecting");
                    break;
                }
                Received::Ended(why) => {
                    println!("connection lost ({why}); reconnecting");
                    break;
                }
            }
        }
        next = (index + 1) % addrs.len();
    }
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("rt-client: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rt-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rt-client: {e}");
            ExitCode::FAILURE
        }
    }
}
