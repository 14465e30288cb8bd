//! HTTP surface of a replica: the WebSocket upgrade on `/ws` (admission: readiness,
//! capacity, authentication, per-user and per-address caps, socket id) and the operational
//! endpoints `/healthz`, `/readyz` and `/metrics`.
//!
//! Every refusal closes its HTTP connection: a refused client must not keep a slot of the
//! accept limit busy on a keep-alive connection while it backs off.

use std::sync::Arc;

use actix::{Actor, AsyncContext};
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use messages::BodyCodec;
use serde_json::json;

use crate::Shared;
use crate::admission::Refusal;
use crate::auth::{self, AuthError};
use crate::metrics::Reject;
use crate::session::{Conn, ConnInit};

/// Registers the routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws", web::get().to(upgrade))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

fn refuse(status: actix_web::http::StatusCode, error: &str, detail: &str) -> HttpResponse {
    HttpResponse::build(status)
        .force_close()
        .json(json!({ "error": error, "detail": detail }))
}

async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, actix_web::Error> {
    let shared = shared.get_ref();
    let readiness = shared.readiness();
    if !readiness.ready() {
        shared.metrics.rejected(Reject::NotReady);
        return Ok(refuse(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            &readiness.describe(),
        ));
    }
    // Checked again when the slot is taken; this early look spares a full replica the
    // token verification.
    if shared.admission.full() {
        shared.metrics.rejected(Reject::Capacity);
        return Ok(refuse(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "this replica holds its maximum number of connections; try another",
        ));
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let identity = auth::token_from(authorization, req.query_string())
        .ok_or(AuthError::Missing)
        .and_then(|token| auth::verify(&token, &shared.config.keys));
    let identity = match identity {
        Ok(identity) => identity,
        Err(err) => {
            shared.metrics.rejected(Reject::Unauthorized);
            tracing::debug!(error = %err, "Upgrade refused: bad token.");
            let mut response = refuse(
                actix_web::http::StatusCode::UNAUTHORIZED,
                "unauthorized",
                &err.to_string(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return Ok(response);
        }
    };
    let ticket = match shared.admission.admit(
        identity.kind,
        &identity.user_id,
        req.peer_addr().map(|a| a.ip()),
    ) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            let (reject, status, error) = match refusal {
                Refusal::Capacity => (
                    Reject::Capacity,
                    actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                    "capacity",
                ),
                Refusal::User => (
                    Reject::UserLimit,
                    actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections_for_user",
                ),
                Refusal::Ip => (
                    Reject::IpLimit,
                    actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                    "too_many_connections_from_address",
                ),
            };
            shared.metrics.rejected(reject);
            tracing::debug!(user_id = %identity.user_id, %refusal, "Upgrade refused: limit.");
            return Ok(refuse(status, error, &refusal.to_string()));
        }
    };
    let Some(id) = shared.mint() else {
        shared.metrics.rejected(Reject::NotReady);
        return Ok(refuse(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no socket id available (worker-id lease or clock); try again",
        ));
    };
    let codec = match servicekit::query::first(req.query_string(), "codec").as_deref() {
        Some("json") => BodyCodec::Json,
        _ => BodyCodec::MsgPack,
    };
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let max_frame = shared.config.limits.max_frame_len();
    let stream = stream
        .max_frame_size(max_frame)
        .aggregate_continuations()
        .max_continuation_size(max_frame);
    shared.metrics.accepted.inc();
    let init = ConnInit {
        id,
        user: identity.user_id,
        kind: identity.kind,
        allowed_rooms: identity.allowed_rooms,
        expires_at: identity.expires_at,
        codec,
        session,
        shared: Arc::clone(shared),
        ticket,
    };
    Conn::create(|ctx| {
        ctx.add_stream(stream);
        Conn::new(init)
    });
    Ok(response)
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
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(shared.metrics.encode())
}
