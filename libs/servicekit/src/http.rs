//! The HTTP APIs' common ground: one JSON error shape (`{"error", "detail"}` with a 4xx/5xx
//! status), actix extractor errors mapped into it, and bearer API-key checks that do not
//! leak key prefixes through timing.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;

/// An API error: a status, a stable snake_case code, and a human-readable detail.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code clients can match on.
    pub error: &'static str,
    /// What was wrong, for humans.
    pub detail: String,
}

impl ApiError {
    /// Any status.
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }

    /// 400 with a code.
    pub fn bad(error: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error, detail)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// 503: a dependency (bus, store) failed; retrying later may help.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.detail)
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(json!({ "error": self.error, "detail": self.detail }))
    }
}

/// Turns actix's own JSON extractor errors (oversized or malformed bodies) into our shape;
/// install with `web::JsonConfig::default().error_handler(|e, _| json_error(e))`.
pub fn json_error(err: actix_web::error::JsonPayloadError) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("limit is {limit} bytes"),
        )
        .into(),
        E::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected application/json",
        )
        .into(),
        other => ApiError::bad("malformed_json", other.to_string()).into(),
    }
}

/// The key of an `Authorization: Bearer <key>` header, if the request carries one.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Accepts the request if it carries `Authorization: Bearer <key>` with one of `keys`.
pub fn authorize(req: &HttpRequest, keys: &[String]) -> Result<(), ApiError> {
    let presented = bearer(req);
    if presented.is_some_and(|p| {
        keys.iter()
            .any(|k| constant_time_eq(k.as_bytes(), p.as_bytes()))
    }) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown API key",
        ))
    }
}

/// `/healthz`: the process is alive and serving HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// `/readyz` for a service whose readiness is its NATS connection.
pub fn ready_response(nats_connected: bool) -> HttpResponse {
    let body = json!({ "ready": nats_connected, "nats_connected": nats_connected });
    if nats_connected {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The content type of OpenMetrics text, what `prometheus-client` encodes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text of `registry`.
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// `/metrics`: OpenMetrics text as `prometheus-client` encodes it.
pub fn metrics_response(text: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(OPENMETRICS_CONTENT_TYPE)
        .body(text)
}

/// Compares without an early exit, so response timing does not reveal key prefixes.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_keys() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_keys_are_checked() {
        let keys = vec!["k1-0123456789abcdef".to_owned()];
        let ok = actix_web::test::TestRequest::default()
            .insert_header(("authorization", "Bearer k1-0123456789abcdef"))
            .to_http_request();
        assert!(authorize(&ok, &keys).is_ok());
        let wrong = actix_web::test::TestRequest::default()
            .insert_header(("authorization", "Bearer nope"))
            .to_http_request();
        assert_eq!(
            authorize(&wrong, &keys).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        let none = actix_web::test::TestRequest::default().to_http_request();
        assert!(authorize(&none, &keys).is_err());
    }
}
