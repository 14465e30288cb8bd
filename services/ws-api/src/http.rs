//! The HTTP API product services use: push (JSON envelope or raw body), batch push,
//! receipts, presence and room queries, server-side room membership, stats, and the
//! OpenAPI document. Every error is a 4xx/5xx with a JSON body `{"error", "detail"}`.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use bytes::Bytes;
use messages::TraceContext;
use messages::envelope::PushEnvelope;
use messages::payload::GatewayControl;
use messages::{
    BodyCodec, ClientKind, GatewayId, RoomId, Route, SocketId, UserId, headers, subject,
};
use serde::Deserialize;
use serde_json::json;
use servicekit::telemetry::{MessageSpan, Operation, server_span};

use servicekit::http::ApiError;

use crate::Shared;
use crate::events::send_control;
use servicekit::clock::now_ms;

/// The OpenAPI document served at `/v1/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// Registers the routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(servicekit::http::healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/openapi.json", web::get().to(openapi))
        .route("/v1/push", web::post().to(push))
        .route("/v1/push/batch", web::post().to(push_batch))
        .route("/v1/pushes/{id}", web::get().to(get_push))
        .route("/v1/users/{id}", web::get().to(get_user))
        .route("/v1/rooms/{id}/members", web::get().to(room_members))
        .route("/v1/rooms/{id}/members", web::post().to(add_member))
        .route(
            "/v1/rooms/{id}/members/{user}",
            web::delete().to(remove_member),
        )
        .route("/v1/stats", web::get().to(stats))
        .configure(crate::demo::routes);
}

fn authorize(req: &HttpRequest, shared: &Shared) -> Result<(), ApiError> {
    servicekit::http::authorize(req, &shared.config.api_keys)
}

/// Who a push goes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Target {
    /// Socket ids (decimal strings or numbers).
    #[serde(default)]
    pub sockets: Vec<serde_json::Value>,
    /// User ids.
    #[serde(default)]
    pub users: Vec<String>,
    /// A room.
    #[serde(default)]
    pub room: Option<String>,
    /// Every app client.
    #[serde(default)]
    pub all: bool,
}

/// A push request in the JSON envelope.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PushRequest {
    /// Recipients.
    pub target: Target,
    /// A JSON body, delivered as JSON.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Or raw bytes, base64-encoded, delivered untouched with `codec`.
    #[serde(default)]
    pub body_base64: Option<String>,
    /// Codec declared for `body_base64` (`raw`, `msgpack`, `json`).
    #[serde(default)]
    pub codec: Option<String>,
    /// Route the client sees on the push frame.
    #[serde(default)]
    pub route: Option<String>,
    /// Whether to track delivery receipts.
    #[serde(default)]
    pub receipt: bool,
    /// Drop the push if a gateway gets it later than this, ms.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// Socket ids that must not get it (e.g. the sender).
    #[serde(default)]
    pub exclude_sockets: Vec<serde_json::Value>,
}

/// A resolved push, ready to publish.
struct Resolved {
    body: Bytes,
    codec: BodyCodec,
    route: Route,
    receipt: bool,
    ttl_ms: Option<u64>,
    exclude: Vec<SocketId>,
    kind: TargetKind,
}

enum TargetKind {
    Sockets(Vec<SocketId>),
    Users(Vec<UserId>),
    Room(RoomId),
    All,
}

fn socket_id(v: &serde_json::Value) -> Result<SocketId, ApiError> {
    let id = match v {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().map(SocketId),
        _ => None,
    };
    id.ok_or_else(|| ApiError::bad("malformed_id", format!("{v} is not a socket id")))
}

fn resolve_target(t: &Target) -> Result<TargetKind, ApiError> {
    let chosen = usize::from(!t.sockets.is_empty())
        + usize::from(!t.users.is_empty())
        + usize::from(t.room.is_some())
        + usize::from(t.all);
    if chosen != 1 {
        return Err(ApiError::bad(
            "bad_target",
            "name exactly one of sockets, users, room, all",
        ));
    }
    if !t.sockets.is_empty() {
        return Ok(TargetKind::Sockets(
            t.sockets.iter().map(socket_id).collect::<Result<_, _>>()?,
        ));
    }
    if !t.users.is_empty() {
        let users = t
            .users
            .iter()
            .map(|u| {
                UserId::new(u.as_str())
                    .map_err(|e| ApiError::bad("malformed_id", format!("user {u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        return Ok(TargetKind::Users(users));
    }
    if let Some(room) = &t.room {
        return RoomId::new(room.as_str())
            .map(TargetKind::Room)
            .map_err(|e| ApiError::bad("malformed_id", format!("room {room:?}: {e}")));
    }
    Ok(TargetKind::All)
}

fn resolve(req: PushRequest, max: usize) -> Result<Resolved, ApiError> {
    let kind = resolve_target(&req.target)?;
    let (body, codec) = match (req.body, req.body_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "bad_body",
                "give body or body_base64, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad(
                "missing_body",
                "give body (JSON) or body_base64",
            ));
        }
        (Some(json), None) => {
            let bytes =
                serde_json::to_vec(&json).map_err(|e| ApiError::bad("bad_body", e.to_string()))?;
            (Bytes::from(bytes), BodyCodec::Json)
        }
        (None, Some(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| ApiError::bad("bad_body", format!("body_base64: {e}")))?;
            let codec = match req.codec.as_deref() {
                None => BodyCodec::Raw,
                Some(c) => BodyCodec::parse(c)
                    .ok_or_else(|| ApiError::bad("bad_codec", format!("codec {c:?}")))?,
            };
            (Bytes::from(bytes), codec)
        }
    };
    if body.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("limit is {max} bytes"),
        ));
    }
    let route = Route::new(req.route.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad("bad_route", e.to_string()))?;
    let exclude = req
        .exclude_sockets
        .iter()
        .map(socket_id)
        .collect::<Result<_, _>>()?;
    Ok(Resolved {
        body,
        codec,
        route,
        receipt: req.receipt,
        ttl_ms: req.ttl_ms,
        exclude,
        kind,
    })
}

/// Publishes a resolved push; returns its id and how many sockets it targeted.
async fn publish(
    shared: &Shared,
    push: Resolved,
    trace: Option<&TraceContext>,
) -> Result<(u64, u64), ApiError> {
    let id = loop {
        let id = rand::random::<u64>() >> 1;
        if id != 0 {
            break id;
        }
    };
    let envelope = PushEnvelope {
        receipt: push.receipt,
        expires_at_ms: push.ttl_ms.map(|ttl| now_ms() + ttl),
        exclude: push.exclude.clone(),
        ..PushEnvelope::new(id, push.route.clone(), push.codec)
    };

    let presence = &shared.presence;
    // (live subject, history subject when the namespace keeps history, envelope)
    let mut messages: Vec<(String, Option<String>, PushEnvelope)> = Vec::new();
    let targeted: u64 = match &push.kind {
        TargetKind::Users(users) => {
            let mut n = 0;
            for user in users {
                n += presence.user(user).len() as u64;
                messages.push((
                    subject::user(user),
                    shared.history.user_subject(user),
                    envelope.clone(),
                ));
            }
            n
        }
        TargetKind::Room(room) => {
            let room_push = PushEnvelope {
                room: Some(room.clone()),
                ..envelope.clone()
            };
            messages.push((
                subject::room(room),
                shared.history.room_subject(room),
                room_push,
            ));
            presence
                .room(room)
                .iter()
                .filter(|r| !push.exclude.contains(&r.socket_id))
                .count() as u64
        }
        TargetKind::All => {
            messages.push((subject::broadcast().to_owned(), None, envelope.clone()));
            presence.count(Some(ClientKind::App)) as u64
        }
        TargetKind::Sockets(ids) => {
            // Group by holding gateway: one message per gateway, socket ids in a header.
            let mut by_gateway: std::collections::BTreeMap<GatewayId, Vec<SocketId>> =
                Default::default();
            for id in ids {
                if let Some(record) = presence.get(*id) {
                    by_gateway.entry(record.gateway).or_default().push(*id);
                }
            }
            let mut n = 0;
            for (gateway, sockets) in by_gateway {
                n += sockets.len() as u64;
                let socket_push = PushEnvelope {
                    sockets,
                    ..envelope.clone()
                };
                messages.push((subject::gateway_push(&gateway), None, socket_push));
            }
            n
        }
    };
    if push.receipt {
        // Track before publishing so no ack can arrive for an unknown push.
        shared
            .receipts
            .create(id, targeted, now_ms())
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            })?;
    }
    for (subject, history, mut envelope) in messages {
        // One producer span per bus message, the child of the request's span.
        let hop = MessageSpan::start(Operation::Publish, &subject, id, trace);
        envelope.trace = hop.context();
        let mut headers = envelope.to_headers();
        headers::stamp_hop(
            &mut headers,
            headers::hop::SERVICE_PUB,
            headers::now_micros(),
        );
        if let Some(history) = history {
            // The stream republishes it on `subject` once stored, with its position.
            shared
                .history
                .append(&history, &headers, push.body.clone())
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        e.to_string(),
                    )
                })?;
            continue;
        }
        shared
            .client
            .publish_with_headers(subject, headers, push.body.clone())
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            })?;
    }
    shared.metrics.pushes.inc();
    Ok((id, targeted))
}

async fn push(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let request = server_span(&req, "/v1/push");
    authorize(&req, &shared)?;
    let max = shared.config.max_body_bytes;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let resolved = if content_type.starts_with("application/json") {
        let request: PushRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
        resolve(request, max)?
    } else if content_type.starts_with("application/msgpack")
        || content_type.starts_with("application/octet-stream")
    {
        raw_push(&req, body, content_type, max)?
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "use application/json (envelope), application/msgpack or application/octet-stream (raw body, target in the query)",
        ));
    };
    let trace = request.context();
    let (id, targeted) = publish(&shared, resolved, trace.as_ref()).await?;
    let mut body = json!({ "push_id": id.to_string(), "targeted": targeted });
    if let Some(trace) = trace {
        // So a caller can look the push up in the trace backend.
        body["trace_id"] = json!(trace.trace_id_hex());
    }
    Ok(HttpResponse::Accepted().json(body))
}

/// A raw body (forwarded untouched) with its target in the query string:
/// `?user=a&user=b`, `?room=r`, `?socket=1`, or `?all=1`, plus `route`, `receipt=1`, `ttl_ms`.
fn raw_push(
    req: &HttpRequest,
    body: Bytes,
    content_type: &str,
    max: usize,
) -> Result<Resolved, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad(
            "missing_body",
            "the request body is the push body",
        ));
    }
    if body.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("limit is {max} bytes"),
        ));
    }
    let mut target = Target {
        sockets: vec![],
        users: vec![],
        room: None,
        all: false,
    };
    let mut route = None;
    let mut receipt = false;
    let mut ttl_ms = None;
    let query = servicekit::query::pairs(req.query_string())
        .map_err(|e| ApiError::bad("bad_query", format!("cannot decode: {e}")))?;
    for (k, v) in &query {
        let v = v.as_str();
        match k.as_str() {
            "user" => target.users.push(v.to_owned()),
            "socket" => target.sockets.push(serde_json::Value::String(v.to_owned())),
            "room" => target.room = Some(v.to_owned()),
            "all" => target.all = v == "1" || v == "true",
            "route" => route = Some(v.to_owned()),
            "receipt" => receipt = v == "1" || v == "true",
            "ttl_ms" => {
                let ttl = v
                    .parse()
                    .map_err(|_| ApiError::bad("bad_ttl", "ttl_ms must be a number"))?;
                ttl_ms = Some(ttl);
            }
            other => {
                return Err(ApiError::bad(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?}"),
                ));
            }
        }
    }
    let kind = resolve_target(&target)?;
    let codec = if content_type.starts_with("application/msgpack") {
        BodyCodec::MsgPack
    } else {
        BodyCodec::Raw
    };
    let route = Route::new(route.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad("bad_route", e.to_string()))?;
    Ok(Resolved {
        body,
        codec,
        route,
        receipt,
        ttl_ms,
        exclude: vec![],
        kind,
    })
}

/// Many pushes in one call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    pushes: Vec<PushRequest>,
}

async fn push_batch(
    req: HttpRequest,
    batch: web::Json<BatchRequest>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let request = server_span(&req, "/v1/push/batch");
    let trace = request.context();
    authorize(&req, &shared)?;
    if batch.pushes.len() > 1000 {
        return Err(ApiError::bad(
            "batch_too_large",
            "at most 1000 pushes per batch",
        ));
    }
    let mut results = Vec::with_capacity(batch.pushes.len());
    for push in batch.into_inner().pushes {
        let outcome = match resolve(push, shared.config.max_body_bytes) {
            Ok(resolved) => publish(&shared, resolved, trace.as_ref()).await,
            Err(e) => Err(e),
        };
        results.push(match outcome {
            Ok((id, targeted)) => json!({ "push_id": id.to_string(), "targeted": targeted }),
            Err(e) => json!({ "error": e.error, "detail": e.detail }),
        });
    }
    Ok(HttpResponse::Ok().json(json!({ "results": results })))
}

async fn get_push(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let id: u64 = path
        .parse()
        .map_err(|_| ApiError::bad("malformed_id", "push ids are decimal numbers"))?;
    let receipt = shared
        .receipts
        .get(id)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        })?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no receipts tracked for this push",
            )
        })?;
    Ok(HttpResponse::Ok().json(json!({
        "push_id": id.to_string(),
        "targeted": receipt.targeted,
        "delivered": receipt.delivered,
        "acked": receipt.acked,
        "created_ms": receipt.created_ms,
    })))
}

fn session_json(r: &crate::presence::SessionRecord) -> serde_json::Value {
    json!({
        "socket_id": r.socket_id.to_string(),
        "user_id": r.user_id.as_str(),
        "gateway": r.gateway.as_str(),
        "kind": r.kind.as_str(),
        "rooms": r.rooms.iter().map(RoomId::as_str).collect::<Vec<_>>(),
        "connected_at_ms": r.connected_at_ms,
        "last_seen_ms": r.last_seen_ms,
    })
}

async fn get_user(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let user =
        UserId::new(path.as_str()).map_err(|e| ApiError::bad("malformed_id", e.to_string()))?;
    let sockets = shared.presence.user(&user);
    let mut gateways: Vec<&str> = sockets.iter().map(|r| r.gateway.as_str()).collect();
    gateways.sort_unstable();
    gateways.dedup();
    Ok(HttpResponse::Ok().json(json!({
        "user_id": user.as_str(),
        "online": !sockets.is_empty(),
        "gateways": gateways,
        "sockets": sockets.iter().map(session_json).collect::<Vec<_>>(),
    })))
}

async fn room_members(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let room =
        RoomId::new(path.as_str()).map_err(|e| ApiError::bad("malformed_id", e.to_string()))?;
    let members = shared.presence.room(&room);
    Ok(HttpResponse::Ok().json(json!({
        "room": room.as_str(),
        "members": members.iter().map(session_json).collect::<Vec<_>>(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberRequest {
    user_id: String,
}

/// Adds every socket of a user to a room, without the client asking.
async fn add_member(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<MemberRequest>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let room =
        RoomId::new(path.as_str()).map_err(|e| ApiError::bad("malformed_id", e.to_string()))?;
    let user = UserId::new(body.user_id.as_str())
        .map_err(|e| ApiError::bad("malformed_id", e.to_string()))?;
    let n = change_membership(&shared, &room, &user, true).await?;
    Ok(HttpResponse::Ok()
        .json(json!({ "room": room.as_str(), "user_id": user.as_str(), "sockets": n })))
}

async fn remove_member(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let (room, user) = path.into_inner();
    let room = RoomId::new(room).map_err(|e| ApiError::bad("malformed_id", e.to_string()))?;
    let user = UserId::new(user).map_err(|e| ApiError::bad("malformed_id", e.to_string()))?;
    let n = change_membership(&shared, &room, &user, false).await?;
    Ok(HttpResponse::Ok()
        .json(json!({ "room": room.as_str(), "user_id": user.as_str(), "sockets": n })))
}

async fn change_membership(
    shared: &Shared,
    room: &RoomId,
    user: &UserId,
    join: bool,
) -> Result<usize, ApiError> {
    let sockets = shared.presence.user(user);
    for record in &sockets {
        let unavailable =
            |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e);
        shared
            .presence
            .modify(record.socket_id, |r| {
                r.rooms.retain(|x| x != room);
                if join {
                    r.rooms.push(room.clone());
                }
            })
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let control = if join {
            GatewayControl::Join {
                socket_id: record.socket_id,
                room: room.clone(),
                msg_id: 0,
            }
        } else {
            GatewayControl::Leave {
                socket_id: record.socket_id,
                room: room.clone(),
                msg_id: 0,
            }
        };
        send_control(shared, &record.gateway, &control)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
    }
    Ok(sockets.len())
}

async fn stats(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let (sessions, users, rooms) = shared.presence.totals();
    Ok(HttpResponse::Ok().json(json!({
        "sessions": sessions,
        "users": users,
        "rooms": rooms,
        "pushes_total": shared.metrics.pushes.get(),
        "pushes_per_sec": shared.push_rate(),
    })))
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

async fn readyz(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    servicekit::http::ready_response(
        shared.client.connection_state() == async_nats::connection::State::Connected,
    )
}

async fn metrics(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    servicekit::http::metrics_response(shared.metrics.encode())
}
