//! HTTP long-polling, the fallback for clients whose WebSocket does not get through
//! (docs/protocol.md section 1.4, ADR 0016): the handshake (`GET /lp`), sending (`POST
//! /lp?sid=`), receiving (`GET /lp?sid=`, held until frames come or the wait ends),
//! ending (`DELETE /lp?sid=`), the move to WebSocket (`/ws?sid=`), and the forwarding of
//! requests that reach a replica other than the session's owner.
//!
//! A long-poll session is a connection like any other: the handshake admits it exactly as
//! an upgrade is admitted (readiness, token, caps, a socket id) and starts the same
//! connection actor, which talks WebSocket framing over a [`pipe::Pipe`] instead of a
//! socket, so heartbeat, rate limit, interest and slow-consumer rules are the actor's.
//!
//! No sticky load balancing: the `sid` holds the socket id, whose worker id names the
//! replica that minted it (section 11). A request for a session minted elsewhere is
//! forwarded on `ws.lp.<worker>` (request/reply) to the replica holding that worker id's
//! lease, which answers with the HTTP response to give. The forwarding replica has checked
//! the token; the owner checks that the token's identity is the session's and the sid's
//! secret. A WebSocket cannot be forwarded, so an upgrade that reaches another replica is
//! refused (421) and the client keeps polling.

pub(crate) mod pipe;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext};
use actix_codec::Framed;
use actix_http::{Request, RequestHead, h1};
use actix_web::http::{Method, StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use messages::longpoll::{LpAnswer, LpForward, LpOp, PATH, Sid, decode_batch};
use messages::{ClientKind, SocketId, UserId};
use serde_json::json;

use crate::Shared;
use crate::auth::{self, AuthError};
use crate::http::{Refused, UpgradeError, send_refusal};
use crate::session::Conn;
use crate::transport::{self, Transport};
use pipe::{Pipe, PipeError, PipeShared, PollOutcome};

/// How long a session that ended stays known, so the client's next poll learns its close
/// code instead of "unknown session".
const LINGER: Duration = Duration::from_secs(30);
/// Added to a forwarded request's own wait before the forwarding replica gives up on it.
const FORWARD_SLACK: Duration = Duration::from_secs(5);
/// How often ended sessions are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One long-poll session as its HTTP requests see it.
#[derive(Debug)]
struct Session {
    secret: [u8; 16],
    user: UserId,
    kind: ClientKind,
    pipe: Arc<PipeShared>,
}

/// The long-poll sessions this replica owns, and the bus subscription that serves
/// requests forwarded by other replicas.
#[derive(Debug, Default)]
pub struct LongPoll {
    sessions: Mutex<HashMap<SocketId, Arc<Session>>>,
    serving: Mutex<Option<tokio::task::AbortHandle>>,
}

impl LongPoll {
    fn get(&self, id: SocketId) -> Option<Arc<Session>> {
        self.sessions.lock().ok()?.get(&id).cloned()
    }

    fn insert(&self, id: SocketId, session: Session) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(id, Arc::new(session));
        }
    }

    /// Forgets sessions that ended more than [`LINGER`] ago.
    fn sweep(&self) {
        let now = Instant::now();
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|_, s| !s.pipe.expired(LINGER, now));
        }
    }

    /// The connection actor of session `id` stopped with `code` (none: the peer closed).
    pub fn ended(&self, id: SocketId, code: Option<u16>, reason: Option<&str>) {
        if let Some(session) = self.get(id) {
            session
                .pipe
                .record_close(code.unwrap_or(1006), reason.unwrap_or("connection ended"));
        }
    }

    /// Sessions known (open, upgraded, or ended within the linger).
    pub fn len(&self) -> usize {
        self.sessions.lock().map_or(0, |s| s.len())
    }

    /// Whether no session is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves forwarded requests for sessions minted under `worker` (the replica's leased
/// worker id; `None` stops serving), and sweeps ended sessions. Called whenever the lease
/// changes.
pub(crate) fn serve(shared: &Arc<Shared>, worker: Option<u16>) {
    let Ok(mut serving) = shared.longpoll.serving.lock() else {
        return;
    };
    if let Some(task) = serving.take() {
        task.abort();
    }
    let Some(worker) = worker else { return };
    let client = shared.bus.client().clone();
    let weak = Arc::downgrade(shared);
    let task = shared.bus.runtime().spawn(async move {
        let subject = messages::subject::longpoll_forward(worker);
        let mut sub = match client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::error!(error = %e, %subject, "Cannot serve forwarded long-poll requests.");
                return;
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                message = sub.next() => {
                    let Some(message) = message else { break };
                    let Some(shared) = weak.upgrade() else { break };
                    let client = client.clone();
                    tokio::spawn(answer_forwarded(shared, client, message));
                }
                _ = sweep.tick() => match weak.upgrade() {
                    Some(shared) => shared.longpoll.sweep(),
                    None => break,
                },
            }
        }
    });
    *serving = Some(task.abort_handle());
}

async fn answer_forwarded(
    shared: Arc<Shared>,
    client: async_nats::Client,
    message: async_nats::Message,
) {
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let answer = match rmp_serde::from_slice::<LpForward>(&message.payload) {
        Ok(fwd) => local(&shared, fwd.op, &fwd.sid, &fwd.user_id, fwd.kind, &fwd.body).await,
        Err(e) => error_answer(400, "bad_request", format!("forwarded request: {e}")),
    };
    match rmp_serde::to_vec_named(&answer) {
        Ok(bytes) => {
            if let Err(e) = client.publish(reply, Bytes::from(bytes)).await {
                tracing::debug!(error = %e, "Answering a forwarded long-poll request failed.");
            }
        }
        Err(e) => tracing::error!(error = %e, "Encoding a long-poll answer failed."),
    }
}

/// Registers the `/lp` routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(PATH, web::get().to(lp_get))
        .route(PATH, web::post().to(lp_post))
        .route(PATH, web::delete().to(lp_delete))
        .route(PATH, web::method(Method::OPTIONS).to(preflight));
}

fn error_answer(status: u16, error: &str, detail: impl std::fmt::Display) -> LpAnswer {
    LpAnswer {
        status,
        json: true,
        body: serde_json::to_vec(&json!({ "error": error, "detail": detail.to_string() }))
            .unwrap_or_default(),
    }
}

fn pipe_error(e: PipeError) -> LpAnswer {
    match e {
        PipeError::Upgraded => error_answer(409, "upgraded", e),
        PipeError::Busy => error_answer(429, "busy", e),
        PipeError::Closed(code, reason) => closed_answer(code, &reason),
    }
}

fn closed_answer(code: u16, reason: &str) -> LpAnswer {
    LpAnswer {
        status: 410,
        json: true,
        body: serde_json::to_vec(&json!({
            "error": "closed",
            "code": code,
            "reason": reason,
            "detail": format!("the session is closed ({code} {reason})"),
        }))
        .unwrap_or_default(),
    }
}

/// Cross-origin pages may call `/lp`: it authenticates by the token each request carries,
/// never by cookies, so a page without the token can do nothing with it (the WebSocket
/// endpoint has no origin check either).
fn with_cors(mut response: HttpResponse) -> HttpResponse {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        header::HeaderValue::from_static("*"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn respond(answer: LpAnswer) -> HttpResponse {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = HttpResponse::build(status);
    let response = if status == StatusCode::NO_CONTENT {
        builder.finish()
    } else {
        let kind = if answer.json {
            "application/json"
        } else {
            "application/octet-stream"
        };
        builder.content_type(kind).body(answer.body)
    };
    with_cors(response)
}

fn refused(refused: &Refused) -> HttpResponse {
    with_cors(refused.to_http())
}

async fn preflight() -> HttpResponse {
    let mut response = HttpResponse::NoContent().finish();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::HeaderValue::from_static("GET, POST, DELETE"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::HeaderValue::from_static("authorization, content-type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        header::HeaderValue::from_static("600"),
    );
    with_cors(response)
}

fn disabled() -> Refused {
    Refused::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "long-polling is disabled on this gateway",
    )
}

/// The token of a request after the handshake: checked like the upgrade's, but without
/// readiness or capacity (the session already holds its slot).
fn identify(shared: &Shared, head: &RequestHead) -> Result<auth::Identity, Refused> {
    let authorization = head
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    auth::token_from(authorization, head.uri.query().unwrap_or(""))
        .ok_or(AuthError::Missing)
        .and_then(|token| auth::verify(&token, &shared.config.keys))
        .map_err(|err| Refused {
            bearer: true,
            ..Refused::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string())
        })
}

fn sid_of(head: &RequestHead) -> Option<String> {
    servicekit::query::first(head.uri.query().unwrap_or(""), "sid")
}

/// The session `sid` names on this replica, if `user`/`kind` may use it.
fn session_for(
    shared: &Shared,
    sid: &str,
    user: &UserId,
    kind: ClientKind,
) -> Result<Arc<Session>, LpAnswer> {
    let sid = Sid::parse(sid).map_err(|e| error_answer(400, "bad_sid", e))?;
    let unknown = || {
        error_answer(
            404,
            "unknown_session",
            "no such session (ended, expired, or its gateway restarted): start a new one",
        )
    };
    let session = shared.longpoll.get(sid.socket).ok_or_else(unknown)?;
    if &session.user != user || session.kind != kind {
        return Err(error_answer(
            403,
            "forbidden",
            "this session belongs to another identity",
        ));
    }
    // A wrong secret is not told apart from an unknown session.
    if !sid.secret_matches(&session.secret) {
        return Err(unknown());
    }
    Ok(session)
}

/// Applies a request to a session this replica owns.
async fn local(
    shared: &Shared,
    op: LpOp,
    sid: &str,
    user: &UserId,
    kind: ClientKind,
    body: &[u8],
) -> LpAnswer {
    let session = match session_for(shared, sid, user, kind) {
        Ok(session) => session,
        Err(answer) => return answer,
    };
    let config = &shared.config;
    match op {
        LpOp::Send => {
            let frames = match decode_batch(body, config.limits.max_frame_len()) {
                Ok(frames) => frames,
                Err(e @ messages::longpoll::BatchError::TooLarge { .. }) => {
                    return error_answer(413, "too_large", e);
                }
                Err(e) => return error_answer(400, "bad_batch", e),
            };
            match session.pipe.send(&frames, config.longpoll_max_post) {
                Ok(()) => LpAnswer {
                    status: 204,
                    json: false,
                    body: Vec::new(),
                },
                Err(e) => pipe_error(e),
            }
        }
        LpOp::Poll => match session.pipe.poll(config.longpoll_wait).await {
            PollOutcome::Frames(frames) => LpAnswer {
                status: 200,
                json: false,
                body: messages::longpoll::encode_batch(frames.iter().map(|f| &f[..])),
            },
            PollOutcome::Upgraded => pipe_error(PipeError::Upgraded),
            PollOutcome::Closed(code, reason) => closed_answer(code, &reason),
        },
        LpOp::Close => {
            session.pipe.close_by_client();
            LpAnswer {
                status: 204,
                json: false,
                body: Vec::new(),
            }
        }
    }
}

/// Applies a request here when this replica minted the session, or forwards it to the
/// replica that did.
async fn dispatch(
    shared: &Arc<Shared>,
    op: LpOp,
    sid: String,
    identity: auth::Identity,
    body: Vec<u8>,
) -> LpAnswer {
    let parsed = match Sid::parse(&sid) {
        Ok(parsed) => parsed,
        Err(e) => return error_answer(400, "bad_sid", e),
    };
    let worker = parsed.socket.parts().worker;
    if shared.readiness().worker_id == Some(worker) {
        return local(shared, op, &sid, &identity.user_id, identity.kind, &body).await;
    }
    let wait = match op {
        LpOp::Poll => shared.config.longpoll_wait + FORWARD_SLACK,
        LpOp::Send | LpOp::Close => FORWARD_SLACK,
    };
    let forward = LpForward {
        op,
        sid,
        user_id: identity.user_id,
        kind: identity.kind,
        body,
    };
    let payload = match rmp_serde::to_vec_named(&forward) {
        Ok(payload) => payload,
        Err(e) => return error_answer(500, "internal", e),
    };
    let client = shared.bus.client().clone();
    let subject = messages::subject::longpoll_forward(worker);
    // On the bus's runtime: the request's timer and the client's connection live there.
    let asked = shared.bus.runtime().spawn(async move {
        let request = async_nats::Request::new()
            .payload(Bytes::from(payload))
            .timeout(Some(wait));
        client.send_request(subject, request).await
    });
    match asked.await {
        Ok(Ok(reply)) => rmp_serde::from_slice::<LpAnswer>(&reply.payload)
            .unwrap_or_else(|e| error_answer(502, "bad_gateway", e)),
        Ok(Err(e)) => match e.kind() {
            async_nats::RequestErrorKind::NoResponders => error_answer(
                404,
                "unknown_session",
                "no gateway holds this session (it restarted or left): start a new one",
            ),
            async_nats::RequestErrorKind::TimedOut => error_answer(
                504,
                "timeout",
                "the gateway holding this session did not answer",
            ),
            _ => error_answer(503, "unavailable", e),
        },
        Err(e) => error_answer(500, "internal", e),
    }
}

/// `GET /lp`: the handshake (no `sid`) or a poll.
async fn lp_get(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let shared = shared.get_ref();
    if !shared.config.longpoll {
        return refused(&disabled());
    }
    let Some(sid) = sid_of(req.head()) else {
        return handshake(shared, req.head());
    };
    let identity = match identify(shared, req.head()) {
        Ok(identity) => identity,
        Err(r) => return refused(&r),
    };
    respond(dispatch(shared, LpOp::Poll, sid, identity, Vec::new()).await)
}

/// The checks of a request on an existing session (`POST`, `DELETE`): long-polling on, a
/// valid token, a `sid`.
fn session_request(
    shared: &Shared,
    head: &RequestHead,
    method: &str,
) -> Result<(auth::Identity, String), Refused> {
    if !shared.config.longpoll {
        return Err(disabled());
    }
    let identity = identify(shared, head)?;
    let sid = sid_of(head).ok_or_else(|| {
        Refused::new(
            StatusCode::BAD_REQUEST,
            "bad_sid",
            format!("{method} /lp needs the sid of a session (query parameter sid)"),
        )
    })?;
    Ok((identity, sid))
}

/// `POST /lp?sid=`: a batch of frames for the session.
async fn lp_post(
    req: HttpRequest,
    mut payload: web::Payload,
    shared: web::Data<Arc<Shared>>,
) -> HttpResponse {
    let shared = shared.get_ref();
    let (identity, sid) = match session_request(shared, req.head(), "POST") {
        Ok(request) => request,
        Err(r) => return refused(&r),
    };
    let max = shared.config.longpoll_max_post;
    let too_large = || {
        let mut response = refused(&Refused::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a POST body may hold at most {max} bytes; send fewer frames per request"),
        ));
        // The rest of the body is not read: the connection cannot be reused.
        response
            .head_mut()
            .set_connection_type(actix_http::ConnectionType::Close);
        response
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        return too_large();
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                return refused(&Refused::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    e.to_string(),
                ));
            }
        };
        if body.len() + chunk.len() > max {
            return too_large();
        }
        body.extend_from_slice(&chunk);
    }
    respond(dispatch(shared, LpOp::Send, sid, identity, body.to_vec()).await)
}

/// `DELETE /lp?sid=`: the client ends the session (like a WebSocket close 1000).
async fn lp_delete(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let shared = shared.get_ref();
    let (identity, sid) = match session_request(shared, req.head(), "DELETE") {
        Ok(request) => request,
        Err(r) => return refused(&r),
    };
    respond(dispatch(shared, LpOp::Close, sid, identity, Vec::new()).await)
}

/// The handshake: admitted exactly like a WebSocket upgrade, then the same connection
/// actor over a pipe. Its welcome is the first frame of the first poll.
fn handshake(shared: &Arc<Shared>, head: &RequestHead) -> HttpResponse {
    let admitted = match crate::http::admit(shared, head) {
        Ok(admitted) => admitted,
        Err(r) => return refused(&r),
    };
    let id = admitted.id;
    let secret: [u8; 16] = rand::random();
    let sid = Sid { socket: id, secret };
    let pipe = Arc::new(PipeShared::default());
    let max_frame = shared.config.limits.max_frame_len();
    let (reader, sink) = transport::split(Box::new(Pipe(Arc::clone(&pipe))), &[], max_frame);
    shared.longpoll.insert(
        id,
        Session {
            secret,
            user: admitted.identity.user_id.clone(),
            kind: admitted.identity.kind,
            pipe,
        },
    );
    shared.metrics.accepted.inc();
    // Agents do not long-poll; a relayed stream is always a WebSocket.
    let init = admitted.into_init(sink, Arc::clone(shared), None);
    Conn::create(|ctx| {
        ctx.add_stream(reader);
        Conn::new(init)
    });
    let hb = shared.config.heartbeat;
    let body = json!({
        "sid": sid.to_string(),
        "upgrades": ["websocket"],
        "pingInterval": hb.base_ms,
        "pingTimeout": hb.grace_ms,
        "pollWaitMs": u64::try_from(shared.config.longpoll_wait.as_millis()).unwrap_or(u64::MAX),
        "maxPostBytes": shared.config.longpoll_max_post,
    });
    with_cors(HttpResponse::Ok().json(body))
}

/// `GET /ws?sid=` with an upgrade: the client's WebSocket takes its long-poll session
/// over (same socket id, rooms and queue). Refused before the handshake when the session
/// is not this replica's (421: the client keeps polling and tries again later), not the
/// token's (403), unknown (404), or already upgraded or closed (409, 410).
pub(crate) async fn upgrade<T: Transport + Send>(
    shared: Arc<Shared>,
    req: Request,
    mut framed: Framed<T, h1::Codec>,
) -> Result<(), UpgradeError> {
    let answer_refusal = |answer: LpAnswer| {
        let detail = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
            .unwrap_or_default();
        let error = match answer.status {
            400 => "bad_sid",
            403 => "forbidden",
            404 => "unknown_session",
            409 => "upgraded",
            410 => "closed",
            _ => "refused",
        };
        let status =
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Refused::new(status, error, detail)
    };
    if !shared.config.longpoll {
        return send_refusal(&mut framed, &disabled()).await;
    }
    let identity = match identify(&shared, req.head()) {
        Ok(identity) => identity,
        Err(r) => return send_refusal(&mut framed, &r).await,
    };
    let Some(sid) = sid_of(req.head()) else {
        return send_refusal(&mut framed, &disabled()).await;
    };
    if let Ok(parsed) = Sid::parse(&sid)
        && shared.readiness().worker_id != Some(parsed.socket.parts().worker)
    {
        let r = Refused::new(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_gateway",
            "this session is held by another gateway replica; keep polling and try again",
        );
        return send_refusal(&mut framed, &r).await;
    }
    let session = match session_for(&shared, &sid, &identity.user_id, identity.kind) {
        Ok(session) => session,
        Err(answer) => return send_refusal(&mut framed, &answer_refusal(answer)).await,
    };
    if let Err(e) = session.pipe.can_take_over() {
        return send_refusal(&mut framed, &answer_refusal(pipe_error(e))).await;
    }
    if !crate::http::accept_handshake(req.head(), &mut framed).await? {
        return Ok(());
    }
    let parts = framed.into_parts();
    let early = Bytes::copy_from_slice(&parts.read_buf);
    match session.pipe.take_over(Box::new(parts.io), early) {
        Ok(()) => {
            shared.metrics.longpoll_upgraded.inc();
            tracing::debug!(%sid, "Long-poll session moved to WebSocket.");
        }
        // Closed in the instant since the check: the socket is dropped, the client sees a
        // failed WebSocket and its next poll the close code.
        Err(e) => tracing::debug!(%sid, error = %e, "Long-poll upgrade lost a race."),
    }
    Ok(())
}
