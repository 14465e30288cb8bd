//! The console's two static files, compiled into the binary with `include_str!` and served
//! from `/console/assets/`: everything a page loads comes from the scheduler itself, which
//! is what the Content-Security-Policy ([`super::CSP`]) allows.

use actix_web::http::header;
use actix_web::{HttpResponse, web};

/// The console's script: live updates over Server-Sent Events, nothing else.
pub const JS: &str = include_str!("assets/console.js");
/// The console's stylesheet.
pub const CSS: &str = include_str!("assets/console.css");

/// `GET /console/assets/{name}`. Public (the login page needs the stylesheet); the files
/// hold nothing secret.
pub async fn serve(name: web::Path<String>) -> HttpResponse {
    let (body, content_type) = match name.as_str() {
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "console.css" => (CSS, "text/css; charset=utf-8"),
        _ => return HttpResponse::NotFound().finish(),
    };
    HttpResponse::Ok()
        .content_type(content_type)
        // Short: a new scheduler version's files are picked up within minutes.
        .insert_header((header::CACHE_CONTROL, "max-age=300"))
        .body(body)
}
