//! `/v1/schedules`: recurring tasks from cron expressions ([`crate::schedule`]). Create
//! (`POST`, with the same `targets`/`spec`/`timeout_ms`/`max_attempts` as a task plus `cron`
//! and `overlap`), list, get (with the next fire time, the last fire time and the last
//! task), delete, pause and resume. Scopes and audit work as for tasks: reads take any key,
//! changes an operator key, and every change is one audit entry in the same transaction.
//! A bad cron expression is a 400 `invalid_cron` and nothing is stored.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use messages::fleet;
use serde::Deserialize;
use serde_json::json;
use servicekit::clock::{now_ms, now_secs};
use servicekit::http::ApiError;
use servicekit::telemetry::server_span;

use super::{TargetsRequest, authorize, spec_json, task_spec};
use crate::Shared;
use crate::audit;
use crate::bus::blocking;
use crate::schedule::CronExpr;
use crate::store::{NewSchedule, Overlap, ScheduleRecord};

/// Registers the routes.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/schedules", web::post().to(create))
        .route("/v1/schedules", web::get().to(list))
        .route("/v1/schedules/{id}", web::get().to(get))
        .route("/v1/schedules/{id}", web::delete().to(delete))
        .route("/v1/schedules/{id}/pause", web::post().to(pause))
        .route("/v1/schedules/{id}/resume", web::post().to(resume));
}

/// Body of `POST /v1/schedules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSchedule {
    /// Cron expression, UTC: 5 fields, or 6 with leading seconds.
    cron: String,
    /// `skip` (default) or `allow`.
    #[serde(default)]
    overlap: Option<String>,
    targets: TargetsRequest,
    spec: fleet::TaskKind,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_attempts: Option<u32>,
}

fn parse_overlap(s: Option<&str>) -> Result<Overlap, ApiError> {
    match s {
        None | Some("skip") => Ok(Overlap::Skip),
        Some("allow") => Ok(Overlap::Allow),
        Some(other) => Err(ApiError::bad(
            "bad_overlap",
            format!("overlap {other:?}: use skip or allow"),
        )),
    }
}

fn schedule_id(path: &str) -> Result<u64, ApiError> {
    path.parse()
        .map_err(|_| ApiError::bad("malformed_id", "schedule ids are decimal numbers"))
}

fn rfc3339(secs: Option<u64>) -> serde_json::Value {
    secs.and_then(|s| i64::try_from(s).ok())
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
        .map_or(serde_json::Value::Null, |t| {
            json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        })
}

/// The API form of a schedule; `next_fire` is computed for `now` (null when paused).
fn schedule_json(rec: &ScheduleRecord, now: u64) -> serde_json::Value {
    let next = if rec.paused {
        None
    } else {
        CronExpr::parse(&rec.cron, 0)
            .ok()
            .and_then(|c| c.next_after(rec.since_secs.max(now)))
    };
    json!({
        "schedule_id": rec.id,
        "cron": rec.cron,
        "timezone": "UTC",
        "overlap": rec.overlap,
        "paused": rec.paused,
        "created_at_ms": rec.created_at_ms,
        "created_by": rec.created_by,
        "task": spec_json(&rec.task),
        "next_fire_secs": next,
        "next_fire_at": rfc3339(next),
        "last_fire_secs": rec.last_fire_secs,
        "last_fire_at": rfc3339(rec.last_fire_secs),
        "last_task_id": rec.last_task_id,
        "last_error": rec.last_error,
        "fired": rec.fired,
        "skipped": rec.skipped,
    })
}

async fn create(
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let request = server_span(&req, "/v1/schedules");
    let actor = authorize(&req, &shared)?.traced(&request);
    let raw = body.into_inner();
    let body: CreateSchedule = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
    let now = now_secs();
    CronExpr::parse(&body.cron, now).map_err(|e| ApiError::bad("invalid_cron", e.to_string()))?;
    let overlap = parse_overlap(body.overlap.as_deref())?;
    let task = task_spec(
        &shared,
        body.targets,
        &body.spec,
        body.timeout_ms,
        body.max_attempts,
        None,
    )?;
    let new = NewSchedule {
        cron: body.cron.trim().to_owned(),
        overlap,
        task,
        created_by: actor.name.clone(),
    };
    let (record, entry) = blocking(&shared, move |store| {
        store.create_schedule(&new, now_ms(), |id| {
            audit::entry(
                &actor,
                audit::SCHEDULE_CREATE,
                format!("schedule/{id}"),
                json!({ "request": raw }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    tracing::info!(schedule = record.id, cron = %record.cron, "Schedule created.");
    Ok(HttpResponse::Created().json(schedule_json(&record, now_secs())))
}

async fn list(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let schedules = blocking(&shared, |store| store.schedules()).await?;
    let now = now_secs();
    Ok(HttpResponse::Ok().json(json!({
        "schedules": schedules.iter().map(|s| schedule_json(s, now)).collect::<Vec<_>>(),
    })))
}

async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let id = schedule_id(&path)?;
    let record = blocking(&shared, move |store| store.schedule(id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no schedule {id}")))?;
    Ok(HttpResponse::Ok().json(schedule_json(&record, now_secs())))
}

async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let id = schedule_id(&path)?;
    let (record, entry) = blocking(&shared, move |store| {
        store.delete_schedule(id, now_ms(), |rec| {
            audit::entry(
                &actor,
                audit::SCHEDULE_DELETE,
                format!("schedule/{id}"),
                json!({ "cron": rec.cron, "fired": rec.fired }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    Ok(HttpResponse::Ok().json(json!({ "schedule_id": record.id, "deleted": true })))
}

async fn pause(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    set_paused(req, path, shared, true).await
}

async fn resume(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    set_paused(req, path, shared, false).await
}

async fn set_paused(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
    paused: bool,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let id = schedule_id(&path)?;
    let action = if paused {
        audit::SCHEDULE_PAUSE
    } else {
        audit::SCHEDULE_RESUME
    };
    let (record, entry) = blocking(&shared, move |store| {
        store.set_schedule_paused(id, paused, now_ms(), |rec| {
            audit::entry(
                &actor,
                action,
                format!("schedule/{id}"),
                json!({ "was_paused": rec.paused != paused }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    Ok(HttpResponse::Ok().json(schedule_json(&record, now_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests_parse_and_overlap_is_checked() {
        let ok: Result<CreateSchedule, _> = serde_json::from_value(json!({
            "cron": "*/5 * * * *",
            "targets": {"labels": {"region": "eu"}},
            "spec": {"kind": "command", "argv": ["uptime"]},
        }));
        assert!(ok.is_ok_and(|c| c.overlap.is_none()));
        let unknown: Result<CreateSchedule, _> = serde_json::from_value(json!({
            "cron": "* * * * *",
            "targets": {"nodes": ["n1"]},
            "spec": {"kind": "command", "argv": ["x"]},
            "every": "5m",
        }));
        assert!(unknown.is_err());
        assert_eq!(parse_overlap(None).ok(), Some(Overlap::Skip));
        assert_eq!(parse_overlap(Some("allow")).ok(), Some(Overlap::Allow));
        assert!(parse_overlap(Some("queue")).is_err());
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(Some(1_767_225_600)), json!("2026-01-01T00:00:00Z"));
        assert_eq!(rfc3339(None), serde_json::Value::Null);
    }
}
