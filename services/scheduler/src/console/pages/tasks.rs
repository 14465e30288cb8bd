//! The Tasks pages: the form that creates a command or probe task (targets by node ids or
//! by label selector), the task history (newest first, filtered by target state), and one
//! task's page: per-target states, output streaming live (the same follow stream as `GET
//! /v1/tasks/{id}/output?follow=1`), results, and cancel.
//!
//! The form is turned into the very JSON body `POST /v1/tasks` takes and handed to the
//! API's own [`crate::http::submit_task`], so validation, the audit entry and the dispatch
//! are the API's. A hidden one-time idempotency key makes a double submit create one task.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};
use serde_json::json;

use super::fleet::parse_selector;
use super::{Nav, ago, badge, csrf, layout, wire_name};
use crate::Shared;
use crate::bus::blocking;
use crate::console::session::{Session, random_token};
use crate::console::{ConsoleError, Form, PAGE_ROWS, action_session, field, page, page_session};
use crate::store::{
    LabelSelector, StoredResult, TargetState, TaskKind, TaskRecord, TaskSpec, TaskSummary,
};

/// Every target state, in lifecycle order (the history filter's choices).
const STATES: [&str; 7] = [
    "pending",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
];

/// A task's kind in a few words ("command: echo hi", "tcp probe 10.0.0.1:22").
pub fn kind_summary(spec: &TaskSpec) -> String {
    let text = match &spec.kind {
        TaskKind::Command { argv, .. } => format!("command: {}", argv.join(" ")),
        TaskKind::TcpProbe { target, .. } => format!("tcp probe {target}"),
        TaskKind::HttpProbe { url, .. } => format!("http probe {url}"),
    };
    if text.chars().count() > 80 {
        let cut: String = text.chars().take(79).collect();
        format!("{cut}…")
    } else {
        text
    }
}

fn targets_summary(spec: &TaskSpec) -> String {
    match &spec.targets {
        crate::store::Targets::Nodes(ids) => ids
            .iter()
            .map(messages::UserId::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        crate::store::Targets::Selector(sel) => super::fleet::selector_text(sel),
    }
}

/// `GET /console/tasks?state=...`
pub async fn list(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let pairs = servicekit::query::pairs(req.query_string())
        .map_err(|e| ConsoleError::Bad(format!("query: {e}")))?;
    let state_text = pairs
        .iter()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let state: Option<TargetState> = if state_text.is_empty() {
        None
    } else {
        Some(
            serde_json::from_value(json!(state_text))
                .map_err(|_| ConsoleError::Bad(format!("state {state_text:?}")))?,
        )
    };
    let tasks = blocking(&shared, move |store| store.tasks(PAGE_ROWS, state)).await?;
    let body = render_list(&tasks, &state_text, &session);
    Ok(page(layout("Tasks", Nav::Tasks, &session, &body)))
}

fn render_list(tasks: &[TaskSummary], state: &str, session: &Session) -> Markup {
    html! {
        h1 { "Tasks" }
        @if session.can_operate() {
            (new_task_form(session))
        } @else {
            p.notice #read-only { "This key is read-only: it can watch tasks but not create or cancel them." }
        }
        h2 { "History" }
        form.filter method="get" action="/console/tasks" {
            select name="state" {
                option value="" { "any target state" }
                @for s in STATES { option value=(s) selected[s == state] { (s) } }
            }
            button type="submit" { "Filter" }
            span.hint { "newest " (PAGE_ROWS) " shown" }
        }
        table #tasks {
            thead { tr { th { "task" } th { "what" } th { "targets" } th { "states" } th { "created" } } }
            tbody {
                @for t in tasks {
                    tr data-task=(t.id) {
                        td { a href={ "/console/tasks/" (t.id) } { "#" (t.id) } }
                        td.code { (kind_summary(&t.spec)) }
                        td { (targets_summary(&t.spec)) }
                        td { @for (s, n) in &t.states { (badge(&wire_name(s))) " " (n) " " } }
                        td { (ago(t.created_at_ms)) }
                    }
                }
            }
        }
    }
}

fn new_task_form(session: &Session) -> Markup {
    html! {
        details.panel open {
            summary { "New task" }
            form #new-task method="post" action="/console/tasks" {
                (csrf(session))
                input type="hidden" name="idem" value=(random_token());
                fieldset {
                    legend { "What" }
                    label { input type="radio" name="kind" value="command" checked; " command" }
                    label { input type="radio" name="kind" value="tcp_probe"; " TCP probe" }
                    label { input type="radio" name="kind" value="http_probe"; " HTTP probe" }
                    label.block for="argv" { "Command: program and arguments, one per line (no shell)" }
                    textarea #argv name="argv" rows="3" placeholder="uptime" {}
                    label.block for="target" { "Probe target: host:port (TCP) or http:// URL" }
                    input #target name="target" placeholder="10.0.0.1:22";
                }
                fieldset {
                    legend { "Where" }
                    label { input type="radio" name="targets_by" value="selector" checked; " label selector" }
                    label { input type="radio" name="targets_by" value="nodes"; " node ids" }
                    input #selector name="selector" placeholder="region=eu,role=web (empty: every agent)";
                    input #nodes name="nodes" placeholder="node-1, node-2";
                }
                fieldset.inline {
                    label { "timeout (s) " input #timeout name="timeout_s" type="number" min="1" value="60"; }
                    label { "attempts " input name="max_attempts" type="number" min="1" max="10" value="1"; }
                }
                button #submit-task type="submit" { "Run" }
            }
        }
    }
}

/// The `POST /v1/tasks` body a submitted form stands for.
pub fn request_of(form: &[(String, String)]) -> Result<serde_json::Value, ConsoleError> {
    let text = |name: &str| field(form, name).map(str::trim).unwrap_or_default();
    let spec = match text("kind") {
        "command" => {
            let argv: Vec<&str> = text("argv")
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            if argv.is_empty() {
                return Err(ConsoleError::Bad(
                    "a command needs a program (one argument per line)".into(),
                ));
            }
            json!({"kind": "command", "argv": argv})
        }
        "tcp_probe" => json!({"kind": "tcp_probe", "target": text("target")}),
        "http_probe" => json!({"kind": "http_probe", "url": text("target")}),
        other => return Err(ConsoleError::Bad(format!("unknown task kind {other:?}"))),
    };
    let targets = match text("targets_by") {
        "nodes" => {
            let ids: Vec<&str> = text("nodes")
                .split([',', ' ', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            json!({"nodes": ids})
        }
        _ => {
            let mut selector = LabelSelector::new();
            parse_selector(text("selector"), &mut selector)?;
            json!({"labels": selector})
        }
    };
    let mut body = json!({"targets": targets, "spec": spec});
    if !text("timeout_s").is_empty() {
        let secs: u64 = text("timeout_s")
            .parse()
            .map_err(|_| ConsoleError::Bad("timeout: a number of seconds".into()))?;
        body["timeout_ms"] = json!(secs.saturating_mul(1000));
    }
    if !text("max_attempts").is_empty() {
        let n: u32 = text("max_attempts")
            .parse()
            .map_err(|_| ConsoleError::Bad("attempts: a number".into()))?;
        body["max_attempts"] = json!(n);
    }
    Ok(body)
}

/// `POST /console/tasks`: creates the task through the API's code, then shows it.
pub async fn create(
    req: HttpRequest,
    form: Form,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = action_session(&req, &shared, &form)?;
    let body = request_of(&form)?;
    // Scoped to the console so it can never collide with a key an API client chose.
    let key = field(&form, "idem")
        .filter(|k| !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|k| format!("console-{k}"));
    let created = crate::http::submit_task(&shared, session.actor(), body, key, None).await?;
    Ok(crate::console::redirect(&format!(
        "/console/tasks/{}",
        created.task_id
    )))
}

fn task_id(s: &str) -> Result<u64, ConsoleError> {
    s.parse()
        .map_err(|_| ConsoleError::NotFound(format!("no task {s:?}")))
}

/// `GET /console/tasks/{id}`
pub async fn task(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let id = task_id(&path)?;
    let (task, results) = blocking(&shared, move |store| {
        Ok((store.task(id)?, store.results_for(id)?))
    })
    .await?;
    let task = task.ok_or_else(|| ConsoleError::NotFound(format!("no task {id}")))?;
    let body = render_task(&task, &results, &session);
    Ok(page(layout(
        &format!("Task {id}"),
        Nav::Tasks,
        &session,
        &body,
    )))
}

fn render_task(task: &TaskRecord, results: &[StoredResult], session: &Session) -> Markup {
    let finished = task.targets.values().all(|s| s.state.is_terminal());
    html! {
        h1 { "Task #" (task.id) }
        table.kv {
            tr { th { "what" } td.code { (kind_summary(&task.spec)) } }
            tr { th { "targets" } td { (targets_summary(&task.spec)) } }
            tr { th { "created" } td { (ago(task.created_at_ms)) } }
            tr { th { "attempts" } td { (task.spec.max_attempts) " max" } }
        }
        @if session.can_operate() && !finished {
            form #cancel method="post" action={ "/console/tasks/" (task.id) "/cancel" } {
                (csrf(session))
                button.danger #cancel-task type="submit" { "Cancel" }
            }
        }
        h2 { "Targets" }
        table #targets {
            thead { tr { th { "node" } th { "state" } th { "attempts" } th { "exit" } th { "updated" } } }
            tbody {
                @for (node, s) in &task.targets {
                    tr {
                        td { a href={ "/console/agents/" (super::encode(node.as_str())) } { (node.as_str()) } }
                        td data-state-of=(node.as_str()) { (badge(&wire_name(&s.state))) }
                        td { (s.attempts) }
                        td data-exit-of=(node.as_str()) {
                            @if let Some(r) = &s.result {
                                @if let Some(c) = r.exit_code { (c) }
                                @if let Some(e) = &r.error { " " span.error { (e) } }
                            }
                        }
                        td { (ago(s.updated_at_ms)) }
                    }
                }
            }
        }
        h2 { "Output " span #stream-state.hint { @if finished { "finished" } @else { "connecting…" } } }
        div #output data-task-events={ "/console/tasks/" (task.id) "/events" } {
            @for (node, s) in &task.targets {
                @if let Some(r) = &s.result {
                    @if !r.stdout_tail.is_empty() || !r.stderr_tail.is_empty() {
                        h3 { (node.as_str()) }
                        pre data-node=(node.as_str()) { (r.stdout_tail) (r.stderr_tail) }
                    }
                }
            }
        }
        @if !results.is_empty() {
            h2 { "Results" }
            table.compact {
                thead { tr { th { "node" } th { "exit" } th { "latency" } th { "applied" } } }
                @for r in results {
                    tr {
                        td { (r.node_id.as_str()) }
                        td { @if let Some(c) = r.body.exit_code { (c) } @if let Some(e) = &r.body.error { " " (e) } }
                        td { @if let Some(l) = r.body.latency_ms { (l) " ms" } }
                        td { (if r.applied { "yes" } else { "late (ignored)" }) }
                    }
                }
            }
        }
    }
}

/// `POST /console/tasks/{id}/cancel`: the API's cancel, with the session's key as actor.
pub async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    form: Form,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = action_session(&req, &shared, &form)?;
    let id = task_id(&path)?;
    crate::http::cancel(&shared, session.actor(), id).await?;
    Ok(crate::console::redirect(&format!("/console/tasks/{id}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn forms_become_api_requests() {
        let body = request_of(&form(&[
            ("kind", "command"),
            ("argv", "sh\r\n-c\r\necho hi; sleep 1\r\n"),
            ("targets_by", "selector"),
            ("selector", "region=eu, role=web"),
            ("timeout_s", "30"),
        ]))
        .unwrap();
        assert_eq!(
            body,
            json!({
                "targets": {"labels": {"region": "eu", "role": "web"}},
                "spec": {"kind": "command", "argv": ["sh", "-c", "echo hi; sleep 1"]},
                "timeout_ms": 30_000,
            })
        );
        let probe = request_of(&form(&[
            ("kind", "tcp_probe"),
            ("target", "127.0.0.1:22"),
            ("targets_by", "nodes"),
            ("nodes", "a, b"),
        ]))
        .unwrap();
        assert_eq!(probe["targets"], json!({"nodes": ["a", "b"]}));
        assert_eq!(probe["spec"]["target"], "127.0.0.1:22");
        assert!(request_of(&form(&[("kind", "command"), ("argv", " ")])).is_err());
        assert!(request_of(&form(&[("kind", "rm")])).is_err());
        assert!(
            request_of(&form(&[
                ("kind", "command"),
                ("argv", "x"),
                ("selector", "novalue")
            ]))
            .is_err()
        );
    }
}
