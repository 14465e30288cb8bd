//! The demo: a chat and presence page built on the JavaScript client library, served by
//! ws-api at `/demo/` with the library's files (compiled in from `clients/js`, so the page
//! needs no CDN and no build step), and the two things a page cannot do alone in a
//! development stack:
//!
//! - **development tokens**: `POST /demo/token {"user": "..."}` mints an app token for any
//!   user id, signed with the gateway's HS256 secret. It exists only when ws-api is given
//!   that secret (`--demo-token-secret`, which `scripts/up` and compose set); without it
//!   the endpoint answers 404, and a page must be given a token some other way. Anyone who
//!   can reach the endpoint can be anyone: never set the flag in production;
//! - **a relay** standing in for a product service: a client's publish on `demo.say` is
//!   pushed to the room `demo.lobby` as `demo.said` with the sender's user id (taken from
//!   the gateway's headers, not from the body), and `demo.here` as `demo.here` (presence
//!   beacons). Only while the demo is enabled.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use async_nats::HeaderMap;
use bytes::Bytes;
use messages::envelope::{PushEnvelope, UpstreamEnvelope};
use messages::{BodyCodec, RoomId, Route, UserId};
use serde_json::json;

use crate::Shared;

/// The room every demo page joins.
pub const ROOM: &str = "demo.lobby";
/// How long a demo token lasts.
const TOKEN_SECS: u64 = 3600;
/// Longest chat line relayed, characters.
const MAX_TEXT: usize = 500;

const INDEX_HTML: &str = include_str!("../demo/index.html");
const APP_JS: &str = include_str!("../demo/app.js");

/// The library files the page imports, as `clients/js` has them.
const LIB: [(&str, &str); 5] = [
    ("index.js", include_str!("../../../clients/js/index.js")),
    ("client.js", include_str!("../../../clients/js/client.js")),
    ("codec.js", include_str!("../../../clients/js/codec.js")),
    ("msgpack.js", include_str!("../../../clients/js/msgpack.js")),
    (
        "transport.js",
        include_str!("../../../clients/js/transport.js"),
    ),
];

/// Registers `/demo/...`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/demo", web::get().to(redirect))
        .route("/demo/", web::get().to(index))
        .route("/demo/app.js", web::get().to(app_js))
        .route("/demo/config.json", web::get().to(config))
        .route("/demo/lib/{file}", web::get().to(lib))
        .route("/demo/token", web::post().to(token));
}

async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("location", "/demo/"))
        .finish()
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(INDEX_HTML)
}

fn javascript(source: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header(("cache-control", "no-cache"))
        .body(source)
}

async fn app_js() -> HttpResponse {
    javascript(APP_JS)
}

async fn lib(file: web::Path<String>) -> HttpResponse {
    match LIB.iter().find(|(name, _)| *name == file.as_str()) {
        Some((_, source)) => javascript(source),
        None => HttpResponse::NotFound().finish(),
    }
}

async fn config(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "gatewayUrl": shared.config.demo_gateway_url,
        "devTokens": shared.config.demo_token_secret.is_some(),
        "room": ROOM,
    }))
}

#[derive(serde::Deserialize)]
struct TokenRequest {
    user: String,
}

fn refuse(status: StatusCode, error: &str, detail: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": error, "detail": detail }))
}

async fn token(shared: web::Data<Arc<Shared>>, body: web::Bytes) -> HttpResponse {
    let Some(secret) = shared.config.demo_token_secret.as_deref() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "development tokens are disabled (ws-api --demo-token-secret)",
        );
    };
    let Ok(req) = serde_json::from_slice::<TokenRequest>(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected {\"user\": \"<user id>\"}",
        );
    };
    let user = match UserId::new(req.user.trim()) {
        Ok(user) => user,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_user", &e.to_string()),
    };
    let exp = servicekit::clock::now_ms() / 1000 + TOKEN_SECS;
    let claims = json!({"sub": user.as_str(), "exp": exp, "kind": "app", "rooms": [ROOM]});
    match jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    ) {
        Ok(token) => {
            HttpResponse::Ok().json(json!({"token": token, "user": user.as_str(), "expires": exp}))
        }
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    }
}

/// Relays a client's `demo.*` publish to the demo room (see the module documentation).
/// Anything else, or anything while the demo is off, is left alone.
pub async fn relay(shared: &Shared, route: &Route, headers: &HeaderMap, payload: &Bytes) {
    if shared.config.demo_token_secret.is_none() {
        return;
    }
    let Ok(up) = UpstreamEnvelope::from_headers(headers) else {
        return;
    };
    let user = up.origin.user_id.as_str();
    let body = match route.as_str() {
        "demo.say" => {
            if up.compressed || up.codec != BodyCodec::Json {
                return;
            }
            let Some(text) = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_owned))
            else {
                return;
            };
            let text: String = text.chars().take(MAX_TEXT).collect();
            json!({"user": user, "text": text})
        }
        "demo.here" => json!({"user": user}),
        _ => return,
    };
    let out_route = if route.as_str() == "demo.say" {
        "demo.said"
    } else {
        "demo.here"
    };
    let (Ok(room), Ok(out_route), Ok(body)) = (
        RoomId::new(ROOM),
        Route::new(out_route),
        serde_json::to_vec(&body),
    ) else {
        return;
    };
    let id = (rand::random::<u64>() >> 1).max(1);
    let envelope = PushEnvelope {
        room: Some(room.clone()),
        ..PushEnvelope::new(id, out_route, BodyCodec::Json)
    };
    let subject = messages::subject::room(&room);
    if let Err(e) = shared
        .client
        .publish_with_headers(subject, envelope.to_headers(), Bytes::from(body))
        .await
    {
        tracing::warn!(error = %e, "Demo relay failed.");
    }
}
