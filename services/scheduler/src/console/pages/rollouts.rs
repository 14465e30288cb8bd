//! The Rollouts pages: every rollout with its state and overall progress, and one
//! rollout's stages as progress bars, its halt reason, the batch in flight, the batch
//! history, and the controls its state allows (pause, resume, promote, abort). Rollouts are
//! rendered from the API's own JSON form ([`crate::http::rollouts::rollout_json`], `view`),
//! so the console shows exactly what `GET /v1/rollouts/{id}` says; controls go through the
//! API's [`crate::http::rollouts::control_as`].

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};
use serde_json::Value;

use super::{Nav, ago, badge, csrf, layout};
use crate::Shared;
use crate::bus::blocking;
use crate::console::session::Session;
use crate::console::{ConsoleError, Form, PAGE_ROWS, action_session, page, page_session};
use crate::http::rollouts::{control_as, rollout_json, view};

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// What a rollout is doing, in a few words.
fn action_summary(r: &Value) -> String {
    if let Some(task) = r.get("task") {
        let spec = &task["spec"];
        let what = match spec["argv"].as_array() {
            Some(argv) => argv.iter().map(text).collect::<Vec<_>>().join(" "),
            None => text(if spec["target"].is_null() {
                &spec["url"]
            } else {
                &spec["target"]
            }),
        };
        format!("{}: {what}", text(&spec["kind"]).replace('_', " "))
    } else if let Some(u) = r.get("upgrade") {
        format!("upgrade to {}", text(&u["version"]))
    } else if let Some(c) = r.get("config") {
        format!("config {} v{}", text(&c["name"]), text(&c["version"]))
    } else {
        String::new()
    }
}

/// `GET /console/rollouts`
pub async fn list(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let rollouts = blocking(&shared, |store| store.rollouts()).await?;
    // Newest first, one page.
    let rows: Vec<Value> = rollouts
        .iter()
        .rev()
        .take(PAGE_ROWS)
        .map(|r| rollout_json(r, None))
        .collect();
    let body = html! {
        h1 { "Rollouts" }
        @if rows.is_empty() { p.hint { "No rollout yet (schedctl rollout, or POST /v1/rollouts)." } }
        @else {
            table #rollouts {
                thead { tr { th { "rollout" } th { "what" } th { "state" } th { "stage" } th { "progress" } th { "by" } th { "updated" } } }
                tbody {
                    @for r in &rows {
                        tr {
                            td { a href={ "/console/rollouts/" (text(&r["rollout_id"])) } { "#" (text(&r["rollout_id"])) } }
                            td { (action_summary(r)) }
                            td { (badge(&text(&r["state"]))) }
                            td { (text(&r["stage"])) }
                            td { (progress(num(&r["succeeded"]) + num(&r["failed"]), num(&r["total"]))) }
                            td { (text(&r["created_by"])) }
                            td { (ago(num(&r["updated_at_ms"]))) }
                        }
                    }
                }
            }
        }
    };
    Ok(page(layout("Rollouts", Nav::Rollouts, &session, &body)))
}

fn progress(done: u64, of: u64) -> Markup {
    html! {
        span.progress {
            progress value=(done) max=(of.max(1)) {}
            " " (done) "/" (of)
        }
    }
}

/// `GET /console/rollouts/{id}`
pub async fn rollout(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let id: u64 = path
        .parse()
        .map_err(|_| ConsoleError::NotFound(format!("no rollout {:?}", path.as_str())))?;
    let r = view(&shared, id).await?;
    let body = render(&r, &session);
    Ok(page(layout(
        &format!("Rollout {id}"),
        Nav::Rollouts,
        &session,
        &body,
    )))
}

/// The controls a rollout in `state` takes.
fn controls(state: &str) -> &'static [&'static str] {
    match state {
        "running" => &["pause", "abort"],
        "paused" => &["resume", "abort"],
        "awaiting_promotion" => &["promote", "pause", "abort"],
        "halted" => &["resume", "abort"],
        _ => &[],
    }
}

fn render(r: &Value, session: &Session) -> Markup {
    let id = text(&r["rollout_id"]);
    let state = text(&r["state"]);
    let empty = Vec::new();
    let stages = r["stages"].as_array().unwrap_or(&empty);
    let history = r["history"].as_array().unwrap_or(&empty);
    html! {
        h1 { "Rollout #" (id) " " (badge(&state)) }
        @if !r["reason"].is_null() {
            p.notice.halt { strong { "Halted: " } (text(&r["reason"])) }
        }
        table.kv {
            tr { th { "what" } td { (action_summary(r)) } }
            tr { th { "created by" } td { (text(&r["created_by"])) " · " (ago(num(&r["created_at_ms"]))) } }
            tr { th { "progress" } td { (progress(num(&r["succeeded"]) + num(&r["failed"]), num(&r["total"]))) " · " (num(&r["failed"])) " failed" } }
            tr { th { "failure threshold" } td { (text(&r["max_failure_percent"])) "% per stage" } }
        }
        @if session.can_operate() && !controls(&state).is_empty() {
            div.actions {
                @for c in controls(&state) {
                    form method="post" action={ "/console/rollouts/" (id) "/" (c) } {
                        (csrf(session))
                        button class=[(*c == "abort").then_some("danger")] type="submit" { (c) }
                    }
                }
            }
        }
        h2 { "Stages" }
        table #stages {
            thead { tr { th { "stage" } th { "nodes" } th { "batch" } th { "progress" } th { "failed / allowed" } } }
            tbody {
                @for s in stages {
                    tr class=[(s["current"] == true).then_some("current")] {
                        td { (text(&s["name"])) " (" (text(&s["size"])) ")" }
                        td { (num(&s["nodes"])) }
                        td { (num(&s["batch"])) }
                        td { (progress(num(&s["succeeded"]) + num(&s["failed"]), num(&s["nodes"]))) }
                        td { (num(&s["failed"])) " / " (num(&s["allowed_failures"])) }
                    }
                }
            }
        }
        @if let Some(b) = r["batch"].as_object() {
            h2 { "Batch in flight" }
            p {
                "batch " (text(&b["index"])) ", " (text(&b["nodes"])) " nodes"
                @if let Some(t) = b["task_id"].as_u64() { " · " a href={ "/console/tasks/" (t) } { "task #" (t) } }
                @if let Some(states) = b["states"].as_object() {
                    " · " @for (s, n) in states { (badge(s)) " " (text(n)) " " }
                }
            }
        }
        @if !history.is_empty() {
            h2 { "Batches" }
            table.compact {
                thead { tr { th { "#" } th { "stage" } th { "nodes" } th { "succeeded" } th { "failed" } th { "unfinished" } } }
                @for h in history.iter().rev() {
                    tr {
                        td { (text(&h["index"])) }
                        td { (text(&h["stage"])) }
                        td { (text(&h["nodes"])) }
                        td { (text(&h["succeeded"])) }
                        td { (text(&h["failed"])) }
                        td { (text(&h["unfinished"])) }
                    }
                }
            }
        }
    }
}

/// `POST /console/rollouts/{id}/{control}`
pub async fn control(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    form: Form,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = action_session(&req, &shared, &form)?;
    let (id, control) = path.into_inner();
    let id: u64 = id
        .parse()
        .map_err(|_| ConsoleError::NotFound(format!("no rollout {id:?}")))?;
    control_as(&shared, session.actor(), id, &control).await?;
    Ok(crate::console::redirect(&format!("/console/rollouts/{id}")))
}
