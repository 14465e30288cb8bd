//! The Gateway tier page: every ws-gateway replica heard from recently ([`crate::gateways`])
//! with its readiness, leased worker id, app and agent connection counts, slow-consumer
//! closes and push/publish rates. The table is rendered here and kept current by the
//! `gateways` live stream ([`crate::console::sse`]), which sends the same rows as JSON.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};
use serde_json::{Value, json};

use super::{Nav, layout};
use crate::Shared;
use crate::console::{ConsoleError, page, page_session};
use crate::gateways::Replica;

/// One replica as the page and the live stream show it.
pub fn row(r: &Replica) -> Value {
    let rate = |v: Option<f64>| v.map(|v| format!("{v:.1}/s")).unwrap_or_else(|| "–".into());
    json!({
        "instance": r.stats.instance.as_str(),
        "ready": r.stats.ready,
        "worker_id": r.stats.worker_id,
        "app_connections": r.stats.app_connections,
        "agent_connections": r.stats.agent_connections,
        "slow_consumer_closes": r.stats.slow_consumer_closes,
        "push_rate": rate(r.push_rate),
        "publish_rate": rate(r.publish_rate),
        "pushes_delivered": r.stats.pushes_delivered,
        "age_s": r.age.as_secs(),
    })
}

/// The rows of every replica heard from.
pub fn rows(shared: &Shared) -> Vec<Value> {
    shared.gateways.replicas().iter().map(row).collect()
}

fn render(rows: &[Value]) -> Markup {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "–".into(),
        other => other.to_string(),
    };
    html! {
        h1 { "Gateway tier" }
        p.hint { "Each ws-gateway replica publishes its counters every few seconds on ws.stats.<instance>; a replica silent for three periods drops off this list." }
        table #gateways data-live="gateways" {
            thead { tr {
                th { "replica" } th { "ready" } th { "worker id" } th { "app conns" } th { "agent conns" }
                th { "slow-consumer closes" } th { "pushes" } th { "publishes" } th { "heard" }
            } }
            tbody {
                @for r in rows {
                    tr data-gateway=(text(&r["instance"])) {
                        td { (text(&r["instance"])) }
                        td { span class={ "badge s-" (if r["ready"] == true { "ready" } else { "not_ready" }) } { (if r["ready"] == true { "ready" } else { "not ready" }) } }
                        td { (text(&r["worker_id"])) }
                        td.num data-field="app_connections" { (text(&r["app_connections"])) }
                        td.num data-field="agent_connections" { (text(&r["agent_connections"])) }
                        td.num { (text(&r["slow_consumer_closes"])) }
                        td.num { (text(&r["push_rate"])) }
                        td.num { (text(&r["publish_rate"])) }
                        td { (text(&r["age_s"])) "s ago" }
                    }
                }
                @if rows.is_empty() { tr.empty { td colspan="9" { "No gateway heard from yet." } } }
            }
        }
    }
}

/// `GET /console/gateways`
pub async fn page_handler(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let body = render(&rows(&shared));
    Ok(page(layout("Gateways", Nav::Gateways, &session, &body)))
}
