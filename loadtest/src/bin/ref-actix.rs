//! Reference server for `scenarios/gateway-bench.sh`: the smallest WebSocket server that
//! looks like ws-gateway to the load generator, written with bare actix-web + actix-ws and
//! one actix actor per connection (the gateway's own design, without its features), so the
//! bench can print the gateway's figures as ratios of what plain actix achieves on the same
//! machine, client and core.
//!
//! One HTTP worker (the bench pins the process to one core). It accepts any `GET /ws` (the
//! token is ignored), sends the gateway's welcome frame, answers heartbeats with a heartbeat
//! ack, and subscribes to the broadcast subject (`ws.all`) once: each bus message becomes
//! one push frame, encoded once (as the gateway does) and sent with `do_send` to every
//! connection actor in a registry of addresses. No auth, ids, limits, rooms or presence.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use actix::{Actor, ActorContext, AsyncContext, Context, Handler, StreamHandler, WrapFuture};
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use actix_ws::{Message as WsMessage, ProtocolError, Session};
use bytes::Bytes;
use clap::Parser;
use futures_util::StreamExt;
use messages::{Frame, FrameKind, GatewayId, Limits, UserId, subject};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[path = "../refserver.rs"]
mod refserver;

use refserver::{Args, Hello, push_frame};

/// Shared by the HTTP handler, the actors and the bus task.
struct State {
    registry: Mutex<HashMap<u64, actix::Addr<Conn>>>,
    next_id: AtomicU64,
    hello: Hello,
}

impl State {
    fn registry(&self) -> MutexGuard<'_, HashMap<u64, actix::Addr<Conn>>> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection.
struct Conn {
    id: u64,
    session: Session,
    state: web::Data<State>,
}

/// A push frame for one connection.
struct Push(Bytes);

impl actix::Message for Push {
    type Result = ();
}

impl Conn {
    /// Queues a frame on the session (a bounded channel to the connection's writer).
    fn send(&self, frame: Bytes, ctx: &mut Context<Self>) {
        let mut session = self.session.clone();
        ctx.spawn(
            async move {
                // A closed session ends through its stream; nothing to do here.
                let _ = session.binary(frame).await;
            }
            .into_actor(self),
        );
    }
}

impl Actor for Conn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let state = &self.state;
        self.send(state.hello.welcome(self.id), ctx);
        state.registry().insert(self.id, ctx.address());
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.state.registry().remove(&self.id);
    }
}

impl Handler<Push> for Conn {
    type Result = ();

    fn handle(&mut self, Push(frame): Push, ctx: &mut Context<Self>) {
        self.send(frame, ctx);
    }
}

impl StreamHandler<Result<WsMessage, ProtocolError>> for Conn {
    fn handle(&mut self, msg: Result<WsMessage, ProtocolError>, ctx: &mut Context<Self>) {
        match msg {
            Ok(WsMessage::Binary(bytes)) => {
                if let Ok(frame) = Frame::decode(&bytes, &Limits::default())
                    && frame.kind == FrameKind::Heartbeat
                {
                    let ack = self.state.hello.ack(frame.msg_id);
                    self.send(ack, ctx);
                }
            }
            Ok(WsMessage::Ping(data)) => {
                let mut session = self.session.clone();
                ctx.spawn(async move { session.pong(&data).await.unwrap_or(()) }.into_actor(self));
            }
            Ok(WsMessage::Close(_)) | Err(_) => {
                let session = self.session.clone();
                actix_web::rt::spawn(async move { session.close(None).await.unwrap_or(()) });
                ctx.stop();
            }
            Ok(_) => {}
        }
    }
}

/// `GET /ws`: upgrades and starts the connection's actor.
async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<State>,
) -> actix_web::Result<HttpResponse> {
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let id = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let state = state.clone();
    Conn::create(move |ctx| {
        ctx.add_stream(stream);
        Conn { id, session, state }
    });
    Ok(response)
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    actix_web::rt::System::new().block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), BoxError> {
    // Subscribed before the listener opens: once the port answers, pushes are delivered.
    let nats = async_nats::connect(&args.nats_url).await?;
    let mut sub = nats.subscribe(subject::broadcast()).await?;
    nats.flush().await?;
    let state = web::Data::new(State {
        registry: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        hello: Hello {
            gateway: GatewayId::new("ref-actix")?,
            user: UserId::new("ref")?,
            heartbeat_ms: args.heartbeat_ms,
        },
    });
    let fan = state.clone();
    actix_web::rt::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(frame) = push_frame(&msg) {
                for addr in fan.registry().values() {
                    addr.do_send(Push(frame.clone()));
                }
            }
        }
    });
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/ws", web::get().to(upgrade))
    })
    .workers(1)
    .backlog(4096)
    .bind(args.listen)?
    .run()
    .await?;
    Ok(())
}
