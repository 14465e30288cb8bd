//! HTTP surface of a replica: the WebSocket upgrade on `/ws` (a `sid` in the query hands
//! it to `longpoll`, which moves a long-poll session onto it) (admission: readiness,
//! capacity, authentication, per-user and per-address caps, socket id) and the operational
//! endpoints `/healthz`, `/readyz` and `/metrics`.
//!
//! actix-web serves the operational endpoints. A request asking for an upgrade never
//! reaches it: actix-http hands such a request, with its connection, to [`upgrade`], which
//! answers the handshake and gives the socket to the connection actor. From then on the
//! HTTP layer holds nothing for that connection (its 16 KiB of buffers are gone).
//!
//! Every refusal closes its HTTP connection: a refused client must not keep a slot of the
//! accept limit busy on a keep-alive connection while it backs off.

use std::sync::Arc;

use actix::{Actor, AsyncContext};
use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody};
use actix_http::{ConnectionType, Request, RequestHead, Response, h1};
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::SinkExt;
use messages::{BodyCodec, ClientKind, SocketId};
use serde_json::json;

use crate::Shared;
use crate::admission::{Refusal, Ticket};
use crate::auth::{self, AuthError};
use crate::metrics::Reject;
use crate::session::{Conn, ConnInit};
use crate::transport::{self, Transport};

/// Registers the routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws", web::get().to(plain_ws))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .configure(crate::longpoll::routes);
}

/// A request turned away before the upgrade, and how to say so.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: StatusCode,
    pub(crate) error: &'static str,
    pub(crate) detail: String,
    /// Adds `WWW-Authenticate` (a token problem).
    pub(crate) bearer: bool,
}

impl Refused {
    pub(crate) fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Refused {
            status,
            error,
            detail: detail.into(),
            bearer: false,
        }
    }

    pub(crate) fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({ "error": self.error, "detail": self.detail }))
            .unwrap_or_default()
    }

    /// The refusal as actix-web's response (a request without an upgrade).
    pub(crate) fn to_http(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        response.force_close();
        if self.bearer {
            response.insert_header((header::WWW_AUTHENTICATE, BEARER_INVALID));
        }
        response.content_type("application/json").body(self.body())
    }
}

const BEARER_INVALID: &str = "Bearer error=\"invalid_token\"";

/// Everything a WebSocket session starts with once the checks passed.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) identity: auth::Identity,
    pub(crate) ticket: Ticket,
    pub(crate) id: SocketId,
    pub(crate) codec: BodyCodec,
    pub(crate) recovery: crate::history::ConnRecovery,
}

impl Admitted {
    /// What the connection actor starts with, writing to `sink`.
    pub(crate) fn into_init(
        self,
        sink: transport::Sink,
        shared: Arc<Shared>,
        via: Option<messages::UserId>,
    ) -> ConnInit {
        ConnInit {
            id: self.id,
            user: self.identity.user_id,
            kind: self.identity.kind,
            allowed_rooms: self.identity.allowed_rooms,
            expires_at: self.identity.expires_at,
            codec: self.codec,
            sink,
            shared,
            ticket: self.ticket,
            recovery: self.recovery,
            via,
        }
    }
}

/// The checks every `/ws` request passes, cheapest first: readiness, capacity, the token.
fn authenticate(shared: &Shared, head: &RequestHead) -> Result<auth::Identity, Refused> {
    let readiness = shared.readiness();
    if !readiness.ready() {
        shared.metrics.rejected(Reject::NotReady);
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            readiness.describe(),
        ));
    }
    // Checked again when the slot is taken; this early look spares a full replica the
    // token verification.
    if shared.admission.full() {
        shared.metrics.rejected(Reject::Capacity);
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "this replica holds its maximum number of connections; try another",
        ));
    }
    let authorization = head
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    auth::token_from(authorization, head.uri.query().unwrap_or(""))
        .ok_or(AuthError::Missing)
        .and_then(|token| auth::verify(&token, &shared.config.keys))
        .map_err(|err| {
            shared.metrics.rejected(Reject::Unauthorized);
            tracing::debug!(error = %err, "Upgrade refused: bad token.");
            Refused {
                bearer: true,
                ..Refused::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
            }
        })
}

/// Everything before an upgrade: [`authenticate`], then the per-user and per-address caps
/// (a slot held for the session) and a socket id.
pub(crate) fn admit(shared: &Shared, head: &RequestHead) -> Result<Admitted, Refused> {
    let identity = authenticate(shared, head)?;
    let query = head.uri.query().unwrap_or("");
    let peer = head.peer_addr.map(|a| a.ip());
    let ticket = shared
        .admission
        .admit(identity.kind, &identity.user_id, peer)
        .map_err(|refusal| {
            let (reject, status, error) = match refusal {
                Refusal::Capacity => (
                    Reject::Capacity,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "capacity",
                ),
                Refusal::User => (
                    Reject::UserLimit,
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections_for_user",
                ),
                Refusal::Ip => (
                    Reject::IpLimit,
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections_from_address",
                ),
            };
            shared.metrics.rejected(reject);
            tracing::debug!(user_id = %identity.user_id, %refusal, "Upgrade refused: limit.");
            Refused::new(status, error, refusal.to_string())
        })?;
    let Some(id) = shared.mint() else {
        shared.metrics.rejected(Reject::NotReady);
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no socket id available (worker-id lease or clock); try again",
        ));
    };
    let codec = match servicekit::query::first(query, "codec").as_deref() {
        Some("json") => BodyCodec::Json,
        _ => BodyCodec::MsgPack,
    };
    let pairs = servicekit::query::pairs(query).unwrap_or_default();
    let recovery = match crate::history::ConnRecovery::from_query(&pairs) {
        // Agents receive nothing from history streams.
        Ok(recovery) if identity.kind == messages::ClientKind::App => recovery,
        Ok(_) => crate::history::ConnRecovery::default(),
        Err(detail) => {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "bad_handshake",
                detail,
            ));
        }
    };
    Ok(Admitted {
        identity,
        ticket,
        id,
        codec,
        recovery,
    })
}

/// `GET /ws` without an upgrade: the same authentication (so a client learns about a bad
/// token the same way), then 426; no slot is taken and no socket id minted.
async fn plain_ws(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    match authenticate(shared.get_ref(), req.head()) {
        Err(refused) => refused.to_http(),
        Ok(_) => {
            let mut response = Refused::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "this endpoint speaks WebSocket only",
            )
            .to_http();
            response.headers_mut().insert(
                header::UPGRADE,
                header::HeaderValue::from_static("websocket"),
            );
            response
        }
    }
}

/// Why an upgrade request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Writing the HTTP response failed (the client went away).
    #[error("writing the upgrade response: {0}")]
    Io(#[from] std::io::Error),
}

/// actix-http logs an upgrade's error and needs a response for it; the connection is
/// closed anyway.
impl From<UpgradeError> for Response<BoxBody> {
    fn from(_: UpgradeError) -> Self {
        Response::with_body(StatusCode::INTERNAL_SERVER_ERROR, BoxBody::new(()))
    }
}

/// Serves a request that asks for a protocol upgrade; the HTTP layer hands over the
/// connection with it. `/ws` becomes a WebSocket session driven by this gateway
/// (`transport`, `ws`); anything else is answered and closed.
pub(crate) async fn upgrade<T: Transport + Send>(
    shared: Arc<Shared>,
    req: Request,
    mut framed: Framed<T, h1::Codec>,
) -> Result<(), UpgradeError> {
    let relay = req.path() == messages::relay::PATH;
    if req.path() != "/ws" && !relay {
        let refused = Refused::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
        return send_refusal(&mut framed, &refused).await;
    }
    // Set on the streams a relay carries (ADR 0015); relays nest one level only.
    let via = req.conn_data::<crate::relay::Via>().map(|v| v.0.clone());
    if relay && via.is_some() {
        let refused = Refused::new(
            StatusCode::FORBIDDEN,
            "relay_nesting",
            "a relay cannot connect through another relay",
        );
        return send_refusal(&mut framed, &refused).await;
    }
    if !relay && servicekit::query::first(req.uri().query().unwrap_or(""), "sid").is_some() {
        // A long-poll session moving to WebSocket, not a new session.
        return crate::longpoll::upgrade(shared, req, framed).await;
    }
    let admitted = match admit(&shared, req.head()) {
        Ok(admitted) => admitted,
        Err(refused) => return send_refusal(&mut framed, &refused).await,
    };
    if relay && admitted.identity.kind != ClientKind::Agent {
        let refused = Refused::new(
            StatusCode::FORBIDDEN,
            "relay_requires_agent",
            "only an agent token may open a relay connection",
        );
        return send_refusal(&mut framed, &refused).await;
    }
    if !accept_handshake(req.head(), &mut framed).await? {
        return Ok(());
    }
    let parts = framed.into_parts();
    if relay {
        // Its messages are relay frames (a data chunk plus its header), not client frames.
        let max = messages::relay::HEADER_LEN + messages::relay::MAX_CHUNK;
        let (reader, sink) = transport::split(Box::new(parts.io), &parts.read_buf, max);
        crate::relay::serve(
            shared,
            admitted.identity,
            admitted.ticket,
            reader,
            sink,
            req.head().peer_addr,
        );
        return Ok(());
    }
    let max_frame = shared.config.limits.max_frame_len();
    // The HTTP layer's buffers go with `parts`; only bytes the client sent early are kept.
    let (reader, sink) = transport::split(Box::new(parts.io), &parts.read_buf, max_frame);
    shared.metrics.accepted.inc();
    let init = admitted.into_init(sink, shared, via);
    Conn::create(|ctx| {
        ctx.add_stream(reader);
        Conn::new(init)
    });
    Ok(())
}

/// Answers the WebSocket handshake of `head` with 101, or refuses a malformed one with
/// 400 `bad_handshake`; `false` when refused.
pub(crate) async fn accept_handshake<T: Transport>(
    head: &RequestHead,
    framed: &mut Framed<T, h1::Codec>,
) -> Result<bool, UpgradeError> {
    let response = match actix_http::ws::handshake(head) {
        Ok(mut builder) => builder.finish().drop_body(),
        Err(e) => {
            let refused = Refused::new(StatusCode::BAD_REQUEST, "bad_handshake", e.to_string());
            send_refusal(framed, &refused).await?;
            return Ok(false);
        }
    };
    framed
        .send(h1::Message::Item((response, BodySize::None)))
        .await?;
    Ok(true)
}

pub(crate) async fn send_refusal<T: Transport>(
    framed: &mut Framed<T, h1::Codec>,
    refused: &Refused,
) -> Result<(), UpgradeError> {
    let body = refused.body();
    let mut response = Response::with_body(refused.status, ());
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if refused.bearer {
        headers.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(BEARER_INVALID),
        );
    }
    let size = BodySize::Sized(body.len() as u64);
    framed.send(h1::Message::Item((response, size))).await?;
    framed.send(h1::Message::Chunk(Some(body.into()))).await?;
    framed.send(h1::Message::Chunk(None)).await?;
    Ok(())
}

async fn healthz(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let r = shared.readiness();
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "nats_connected": r.nats,
        "probe_answered": r.probe,
        "worker_id": r.worker_id,
        "draining": r.draining,
        "connections": shared.connections(),
    }))
}

async fn readyz(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let r = shared.readiness();
    shared.metrics.ready.set(i64::from(r.ready()));
    let body = json!({
        "ready": r.ready(),
        "nats_connected": r.nats,
        "worker_id": r.worker_id,
        "draining": r.draining,
        "detail": r.describe(),
    });
    if r.ready() {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let r = shared.readiness();
    shared.metrics.ready.set(i64::from(r.ready()));
    servicekit::http::metrics_response(shared.metrics.encode())
}
