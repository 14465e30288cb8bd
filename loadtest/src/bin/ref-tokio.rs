//! Reference server for `scenarios/gateway-bench.sh`: the smallest WebSocket server that
//! looks like ws-gateway to the load generator, written with bare tokio-tungstenite, so the
//! bench can print the gateway's figures as ratios of what plain tokio achieves on the same
//! machine, client and core.
//!
//! One tokio task per connection on a current-thread runtime (the bench pins the process to
//! one core), tungstenite with a 4 KiB read buffer and an 8 KiB write buffer. It accepts any
//! `GET /ws` (the token is ignored), sends the gateway's welcome frame, answers heartbeats
//! with a heartbeat ack, and subscribes to the broadcast subject (`ws.all`) once: each bus
//! message becomes one push frame, encoded once (as the gateway does) and handed to every
//! connection through a tokio broadcast channel. No auth, ids, limits, rooms or presence.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use messages::{Frame, FrameKind, GatewayId, Limits, UserId, subject};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pushes a slow connection may fall behind before it skips some (counted as lost).
const BROADCAST_CAPACITY: usize = 4096;

#[path = "../refserver.rs"]
mod refserver;

use refserver::{Args, Hello, push_frame};

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), BoxError> {
    // Subscribed before the listener opens: once the port answers, pushes are delivered.
    let nats = async_nats::connect(&args.nats_url).await?;
    let mut sub = nats.subscribe(subject::broadcast()).await?;
    nats.flush().await?;
    let (pushes, _) = broadcast::channel::<Bytes>(BROADCAST_CAPACITY);
    let fan = pushes.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(frame) = push_frame(&msg) {
                // No receiver (no connection) is not an error.
                let _ = fan.send(frame);
            }
        }
    });
    let hello = Arc::new(Hello {
        gateway: GatewayId::new("ref-tokio")?,
        user: UserId::new("ref")?,
        heartbeat_ms: args.heartbeat_ms,
    });
    let socket = if args.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(args.listen)?;
    let listener = socket.listen(4096)?;
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, mostly: back off instead of spinning.
                eprintln!("ref-tokio: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        next_id += 1;
        let (hello, rx) = (Arc::clone(&hello), pushes.subscribe());
        tokio::spawn(async move {
            // A failed connection only ends its own task.
            let _ = connection(stream, next_id, &hello, rx).await;
        });
    }
}

/// Accepts the upgrade on `/ws` only (the signature is tungstenite's `Callback`).
#[allow(clippy::result_large_err)]
fn only_ws(request: &Request, response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() == "/ws" {
        return Ok(response);
    }
    let mut refused = ErrorResponse::new(Some("not found".to_owned()));
    *refused.status_mut() = StatusCode::NOT_FOUND;
    Err(refused)
}

async fn connection(
    stream: TcpStream,
    id: u64,
    hello: &Hello,
    mut pushes: broadcast::Receiver<Bytes>,
) -> Result<(), WsError> {
    stream.set_nodelay(true)?;
    // Small buffers; frames fed between flushes go out in writes of up to 8 KiB.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192);
    let mut ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, only_ws, Some(config)).await?;
    ws.send(Message::Binary(hello.welcome(id))).await?;
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    if let Ok(frame) = Frame::decode(&bytes, &Limits::default())
                        && frame.kind == FrameKind::Heartbeat
                    {
                        ws.send(Message::Binary(hello.ack(frame.msg_id))).await?;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
            },
            push = pushes.recv() => match push {
                Ok(frame) => {
                    // Everything already queued goes out in one flush.
                    ws.feed(Message::Binary(frame)).await?;
                    while let Ok(more) = pushes.try_recv() {
                        ws.feed(Message::Binary(more)).await?;
                    }
                    ws.flush().await?;
                }
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
        }
    }
    Ok(())
}
