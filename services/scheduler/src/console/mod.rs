//! The operator web console, served at `/console` by the active scheduler: server-rendered
//! HTML ([`maud`]), one small script and one stylesheet served from here ([`assets`]), and
//! live updates over Server-Sent Events ([`sse`]). No build step, no CDN.
//!
//! This module owns the routes, the session check every page makes, the checks every
//! state-changing form passes ([`session`]: CSRF token, same origin, operator scope) and the
//! security headers on every console response. The pages ([`pages`]) read through the
//! same store queries as the `/v1` API, and every action (create or cancel a task, revoke an
//! agent, control a rollout) calls the very function the API handler calls, so it is
//! validated and audited the same way, with the session's key name as the actor.
//!
//! ADR 0019 says why it is built this way.

pub mod assets;
pub mod pages;
pub mod session;
pub mod sse;

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, ContentType};
use actix_web::middleware::DefaultHeaders;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use maud::{DOCTYPE, Markup, html};
use serde_json::json;
use servicekit::http::ApiError;

use crate::Shared;
use crate::audit;
use crate::auth::{self, Scope};
use session::Session;

/// The Content-Security-Policy of every console response: scripts and styles only from the
/// console's own files (no inline code), images from here or `data:`, never framed.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; frame-ancestors 'none'";

/// Rows one list page shows; more are reached with `page=`.
pub const PAGE_ROWS: usize = 200;

/// Audit action: a console login.
pub const LOGIN: &str = "console.login";
/// Audit action: a refused console login (the actor is `anonymous`).
pub const LOGIN_FAILED: &str = "console.login_failed";
/// Audit action: a console logout.
pub const LOGOUT: &str = "console.logout";

/// The console's memory: sessions and the failed-login throttle.
#[derive(Debug, Default)]
pub struct ConsoleState {
    /// Live sessions.
    pub sessions: session::Sessions,
    /// Failed logins per address.
    pub throttle: session::Throttle,
}

/// Registers the console's routes under `/console`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/console")
            .wrap(
                DefaultHeaders::new()
                    .add(("Content-Security-Policy", CSP))
                    .add(("X-Content-Type-Options", "nosniff"))
                    .add(("Referrer-Policy", "same-origin"))
                    .add(("X-Frame-Options", "DENY")),
            )
            .route("", web::get().to(home))
            .route("/", web::get().to(home))
            .route("/login", web::get().to(login_page))
            .route("/login", web::post().to(login))
            .route("/logout", web::post().to(logout))
            .route("/assets/{name}", web::get().to(assets::serve))
            .route("/fleet", web::get().to(pages::fleet::list))
            .route("/agents/{id}", web::get().to(pages::fleet::agent))
            .route("/agents/{id}/revoke", web::post().to(pages::fleet::revoke))
            .route("/tasks", web::get().to(pages::tasks::list))
            .route("/tasks", web::post().to(pages::tasks::create))
            .route("/tasks/{id}", web::get().to(pages::tasks::task))
            .route("/tasks/{id}/cancel", web::post().to(pages::tasks::cancel))
            .route("/tasks/{id}/events", web::get().to(sse::task))
            .route("/rollouts", web::get().to(pages::rollouts::list))
            .route("/rollouts/{id}", web::get().to(pages::rollouts::rollout))
            .route(
                "/rollouts/{id}/{control}",
                web::post().to(pages::rollouts::control),
            )
            .route("/configs", web::get().to(pages::configs::list))
            .route("/configs/{name}", web::get().to(pages::configs::config))
            .route("/gateways", web::get().to(pages::gateways::page_handler))
            .route("/live/{topic}", web::get().to(sse::live))
            .default_service(web::to(not_found)),
    );
}

/// Why a console request was refused. Pages get a small HTML page saying so; a missing
/// session on a page is a redirect to the login form.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No live session on a page: go and log in.
    #[error("log in first")]
    Login,
    /// No live session on a form post or an event stream.
    #[error("no session; log in again")]
    Unauthenticated,
    /// The form's CSRF token is missing or not the session's.
    #[error("the form's CSRF token is missing or wrong; reload the page and try again")]
    Csrf,
    /// The request came from another site.
    #[error("cross-site request refused")]
    CrossSite,
    /// A read-only key tried to change something.
    #[error("the key {0:?} is read-only; this needs an operator key")]
    ReadOnly(String),
    /// Too many failed logins from this address.
    #[error("too many failed logins; wait a minute")]
    RateLimited,
    /// Nothing here.
    #[error("{0}")]
    NotFound(String),
    /// A form or query the console cannot use.
    #[error("{0}")]
    Bad(String),
    /// What the shared API code refused or failed with.
    #[error("{}: {}", .0.error, .0.detail)]
    Api(ApiError),
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        ConsoleError::Api(e)
    }
}

impl From<crate::bus::BusError> for ConsoleError {
    fn from(e: crate::bus::BusError) -> Self {
        ConsoleError::Api(e.into())
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::Login => StatusCode::SEE_OTHER,
            ConsoleError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ConsoleError::Csrf | ConsoleError::CrossSite | ConsoleError::ReadOnly(_) => {
                StatusCode::FORBIDDEN
            }
            ConsoleError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Bad(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Api(e) => e.status,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ConsoleError::Login = self {
            return redirect("/console/login");
        }
        let status = self.status_code();
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "Console: " (status.as_u16()) }
                    link rel="stylesheet" href="/console/assets/console.css";
                }
                body {
                    main.narrow {
                        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                        p.error { (self.to_string()) }
                        p { a href="/console/fleet" { "Back to the console" } }
                    }
                }
            }
        };
        HttpResponse::build(status)
            .content_type(ContentType::html())
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(body.into_string())
    }
}

/// A page response: HTML, never cached (it shows live state and carries a CSRF token).
pub fn page(markup: Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::html())
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(markup.into_string())
}

/// A 303 to `location` (after a form post, so a reload does not post again).
pub fn redirect(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// The session of a page request; [`ConsoleError::Login`] (a redirect) without one.
pub fn page_session(req: &HttpRequest, shared: &Shared) -> Result<Session, ConsoleError> {
    session::cookie_value(req)
        .and_then(|id| shared.console.sessions.get(&id))
        .ok_or(ConsoleError::Login)
}

/// A submitted form as (name, value) pairs.
pub type Form = web::Form<Vec<(String, String)>>;

/// The first value of `name` in a form.
pub fn field<'f>(form: &'f [(String, String)], name: &str) -> Option<&'f str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The checks of every state-changing form: a live session, from the console's own
/// origin, with the session's CSRF token, by an operator key. Returns the session.
pub fn action_session(
    req: &HttpRequest,
    shared: &Shared,
    form: &[(String, String)],
) -> Result<Session, ConsoleError> {
    let session = session::cookie_value(req)
        .and_then(|id| shared.console.sessions.get(&id))
        .ok_or(ConsoleError::Unauthenticated)?;
    if !session::same_origin(req) {
        tracing::warn!(actor = %session.key_name, path = req.path(), "Console: cross-site post refused.");
        return Err(ConsoleError::CrossSite);
    }
    if !session::csrf_ok(&session, field(form, "csrf")) {
        tracing::warn!(actor = %session.key_name, path = req.path(), "Console: CSRF token refused.");
        return Err(ConsoleError::Csrf);
    }
    if !session.can_operate() {
        tracing::warn!(actor = %session.key_name, path = req.path(), "Console: a read-only key was refused a change.");
        return Err(ConsoleError::ReadOnly(session.key_name.clone()));
    }
    Ok(session)
}

async fn home(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    match page_session(&req, &shared) {
        Ok(_) => redirect("/console/fleet"),
        Err(_) => redirect("/console/login"),
    }
}

async fn not_found() -> Result<HttpResponse, ConsoleError> {
    Err(ConsoleError::NotFound("no such console page".into()))
}

async fn login_page(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> HttpResponse {
    if page_session(&req, &shared).is_ok() {
        return redirect("/console/fleet");
    }
    page(pages::login(None))
}

/// `POST /console/login`: the API key in the form becomes a session. Failures are audited
/// (actor `anonymous`) and counted per address; past [`session::MAX_FAILURES`] a minute the
/// address gets 429 without its key being looked at.
async fn login(
    req: HttpRequest,
    form: Form,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    if !session::same_origin(&req) {
        return Err(ConsoleError::CrossSite);
    }
    let ip = req
        .peer_addr()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    if !shared.console.throttle.allows(ip) {
        tracing::warn!(%ip, "Console: login throttled.");
        return Err(ConsoleError::RateLimited);
    }
    let presented = field(&form, "key").map(str::trim).unwrap_or_default();
    let Some(key) = auth::find(&shared.config.api_keys, presented) else {
        shared.console.throttle.failed(ip);
        let anonymous = auth::Actor {
            name: "anonymous".into(),
            scope: Scope::Read,
            trace_id: None,
        };
        audit::record(
            &shared,
            &anonymous,
            LOGIN_FAILED,
            "console",
            json!({ "ip": ip.to_string() }),
        )
        .await?;
        return Ok(HttpResponse::Unauthorized()
            .content_type(ContentType::html())
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(pages::login(Some("Unknown API key.")).into_string()));
    };
    let (id, session) = shared.console.sessions.create(key.name(), key.scope());
    audit::record(
        &shared,
        &session.actor(),
        LOGIN,
        "console",
        json!({ "ip": ip.to_string(), "scope": key.scope().as_str() }),
    )
    .await?;
    tracing::info!(actor = key.name(), "Console: logged in.");
    let secure = shared.config.tls.is_some();
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/console/fleet"))
        .insert_header((header::SET_COOKIE, session::set_cookie(&id, secure)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish())
}

/// `POST /console/logout`: ends the session on the server, not just in the browser.
/// Needs the CSRF token (a forged logout is a nuisance, not a risk, but costs nothing to
/// stop) and works for read-only sessions too.
async fn logout(
    req: HttpRequest,
    form: Form,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let id = session::cookie_value(&req).ok_or(ConsoleError::Unauthenticated)?;
    let session = shared
        .console
        .sessions
        .get(&id)
        .ok_or(ConsoleError::Unauthenticated)?;
    if !session::same_origin(&req) {
        return Err(ConsoleError::CrossSite);
    }
    if !session::csrf_ok(&session, field(&form, "csrf")) {
        return Err(ConsoleError::Csrf);
    }
    shared.console.sessions.remove(&id);
    audit::record(&shared, &session.actor(), LOGOUT, "console", json!({})).await?;
    let secure = shared.config.tls.is_some();
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/console/login"))
        .insert_header((header::SET_COOKIE, session::clear_cookie(secure)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish())
}
