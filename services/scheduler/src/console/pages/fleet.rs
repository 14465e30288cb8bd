//! The Fleet pages: counts by state, label and agent version over the whole registry, a
//! filtered and paged agent list (the API's label selector, `key=value` pairs, and state),
//! and one agent's page: labels, version, the config documents it should run and their
//! state, its retained reports as small SVG charts, recent tasks, and the revoke action.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};
use messages::UserId;

use super::{Nav, ago, badge, csrf, layout, pager, query_string, wire_name};
use crate::Shared;
use crate::bus::blocking;
use crate::console::{ConsoleError, Form, PAGE_ROWS, action_session, page, page_session};
use crate::store::{AgentRecord, AgentState, LabelSelector, Report, Targets, TaskRecord};

/// Distinct `label=value` pairs the counts show (the most common first).
const TOP_LABELS: usize = 24;
/// Tasks looked at for an agent's "recent tasks".
const RECENT_TASKS_SCANNED: usize = 200;
/// Tasks an agent's page lists.
const RECENT_TASKS_SHOWN: usize = 20;

/// The fleet list's filters, from the query string.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Labels every listed agent has.
    pub selector: LabelSelector,
    /// Only agents in this state.
    pub state: Option<AgentState>,
    /// Only agents running this version.
    pub version: Option<String>,
    /// Page number, from 0.
    pub page: usize,
}

/// Parses `key=value[,key=value...]` (the API's `label=` form, comma-separated) into
/// `selector`.
pub fn parse_selector(text: &str, selector: &mut LabelSelector) -> Result<(), ConsoleError> {
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| ConsoleError::Bad(format!("label {pair:?}: use key=value")))?;
        selector.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(())
}

/// The selector as the filter box shows it.
pub fn selector_text(selector: &LabelSelector) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Filter {
    /// Reads `selector=`, `label=` (repeatable, as in `GET /v1/agents`), `state=`,
    /// `version=` and `page=`.
    pub fn parse(query: &str) -> Result<Filter, ConsoleError> {
        let pairs = servicekit::query::pairs(query)
            .map_err(|e| ConsoleError::Bad(format!("query: {e}")))?;
        let mut f = Filter::default();
        for (k, v) in pairs {
            match k.as_str() {
                "selector" | "label" => parse_selector(&v, &mut f.selector)?,
                "state" if v.is_empty() => {}
                "state" => {
                    f.state = Some(match v.as_str() {
                        "online" => AgentState::Online,
                        "degraded" => AgentState::Degraded,
                        "offline" => AgentState::Offline,
                        other => return Err(ConsoleError::Bad(format!("state {other:?}"))),
                    });
                }
                "version" => f.version = Some(v).filter(|v| !v.is_empty()),
                "page" => f.page = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Ok(f)
    }

    fn matches(&self, a: &AgentRecord) -> bool {
        a.matches(&self.selector)
            && self.state.is_none_or(|s| s == a.state)
            && self.version.as_ref().is_none_or(|v| *v == a.version)
    }

    fn query(&self) -> String {
        let state = self.state.map(|s| wire_name(&s)).unwrap_or_default();
        query_string(&[
            ("selector", &selector_text(&self.selector)),
            ("state", &state),
            ("version", self.version.as_deref().unwrap_or("")),
        ])
    }
}

/// What the fleet page shows, computed in one pass over the registry.
#[derive(Debug, Default)]
pub struct FleetView {
    /// Agents per state, over the whole fleet.
    pub states: BTreeMap<AgentState, usize>,
    /// Agents per `label=value`, the most common [`TOP_LABELS`].
    pub labels: Vec<(String, usize)>,
    /// Agents per version.
    pub versions: BTreeMap<String, usize>,
    /// Registered agents.
    pub total: usize,
    /// Agents the filter matches.
    pub matched: usize,
    /// The page of matching agents.
    pub rows: Vec<AgentRecord>,
}

/// Builds the fleet view from the whole registry: counts over all agents, `filter`'s page
/// of the matching ones.
pub fn fleet_view(agents: &[AgentRecord], filter: &Filter) -> FleetView {
    let mut view = FleetView {
        total: agents.len(),
        ..FleetView::default()
    };
    // Counted by reference: one pass over 10,000 agents allocates only per distinct value.
    let mut labels: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut versions: BTreeMap<&str, usize> = BTreeMap::new();
    let skip = filter.page.saturating_mul(PAGE_ROWS);
    for a in agents {
        *view.states.entry(a.state).or_default() += 1;
        *versions.entry(a.version.as_str()).or_default() += 1;
        for (k, v) in &a.labels {
            *labels.entry((k.as_str(), v.as_str())).or_default() += 1;
        }
        if filter.matches(a) {
            if view.matched >= skip && view.rows.len() < PAGE_ROWS {
                view.rows.push(a.clone());
            }
            view.matched += 1;
        }
    }
    view.versions = versions
        .into_iter()
        .map(|(v, n)| (v.to_owned(), n))
        .collect();
    let mut labels: Vec<_> = labels.into_iter().collect();
    labels.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    labels.truncate(TOP_LABELS);
    view.labels = labels
        .into_iter()
        .map(|((k, v), n)| (format!("{k}={v}"), n))
        .collect();
    view
}

/// `GET /console/fleet`
pub async fn list(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let filter = Filter::parse(req.query_string())?;
    let f = filter.clone();
    let view = blocking(&shared, move |store| {
        Ok(fleet_view(&store.agents(&LabelSelector::new(), None)?, &f))
    })
    .await?;
    Ok(page(layout(
        "Fleet",
        Nav::Fleet,
        &session,
        &render_list(&view, &filter),
    )))
}

fn render_list(view: &FleetView, filter: &Filter) -> Markup {
    let count = |s: AgentState| view.states.get(&s).copied().unwrap_or(0);
    let has_more = filter.page.saturating_add(1).saturating_mul(PAGE_ROWS) < view.matched;
    html! {
        h1 { "Fleet" }
        section.cards data-live="fleet" {
            div.card { div.num data-count="total" { (view.total) } div.label { "registered" } }
            div.card.online { div.num data-count="online" { (count(AgentState::Online)) } div.label { "online" } }
            div.card.degraded { div.num data-count="degraded" { (count(AgentState::Degraded)) } div.label { "degraded" } }
            div.card.offline { div.num data-count="offline" { (count(AgentState::Offline)) } div.label { "offline" } }
        }
        section.split {
            div {
                h2 { "Versions" }
                table.compact {
                    @for (version, n) in &view.versions {
                        tr {
                            td { a href={ "/console/fleet?" (query_string(&[("version", version)])) } { (version) } }
                            td.num { (n) }
                        }
                    }
                }
            }
            div {
                h2 { "Labels" }
                div.chips {
                    @for (pair, n) in &view.labels {
                        a.chip href={ "/console/fleet?" (query_string(&[("selector", pair)])) } { (pair) " " span.n { (n) } }
                    }
                }
            }
        }
        h2 { "Agents" }
        form.filter method="get" action="/console/fleet" {
            input name="selector" placeholder="region=eu,role=web" value=(selector_text(&filter.selector));
            select name="state" {
                option value="" { "any state" }
                @for s in ["online", "degraded", "offline"] {
                    option value=(s) selected[filter.state.map(|x| wire_name(&x)).as_deref() == Some(s)] { (s) }
                }
            }
            input name="version" placeholder="version" value=(filter.version.as_deref().unwrap_or(""));
            button type="submit" { "Filter" }
            span.hint { (view.matched) " of " (view.total) " match" }
        }
        table #agents {
            thead { tr { th { "node" } th { "state" } th { "hostname" } th { "version" } th { "labels" } th { "last seen" } } }
            tbody {
                @for a in &view.rows {
                    tr data-node=(a.node_id.as_str()) {
                        td { a href={ "/console/agents/" (super::encode(a.node_id.as_str())) } { (a.node_id.as_str()) } }
                        td { (badge(&wire_name(&a.state))) }
                        td { (a.hostname) }
                        td { (a.version) }
                        td.labels { @for (k, v) in &a.labels { span.chip { (k) "=" (v) } } }
                        td { (ago(a.last_seen_ms)) }
                    }
                }
            }
        }
        (pager("/console/fleet", &filter.query(), filter.page, has_more))
    }
}

/// One agent's page data.
struct AgentView {
    agent: AgentRecord,
    pinned: std::collections::BTreeMap<String, String>,
    reports: Vec<Report>,
    configs: Vec<(String, crate::store::ConfigNodeStatus)>,
    tasks: Vec<TaskRecord>,
}

/// `GET /console/agents/{id}`
pub async fn agent(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let node = crate::http::node_id(&path)?;
    let n = node.clone();
    let view = blocking(&shared, move |store| {
        let Some(agent) = store.agent(&n)? else {
            return Ok(None);
        };
        let pinned = store.pinned_labels(&n)?;
        let reports = store.reports(&n)?;
        let mut configs = Vec::new();
        for c in store.configs()? {
            if c.nodes.contains(&n) {
                let (_, nodes) = store.config_status(&c.name)?;
                if let Some(status) = nodes.into_iter().find(|s| s.node_id == n.as_str()) {
                    configs.push((c.name.clone(), status));
                }
            }
        }
        let mut tasks = Vec::new();
        for t in store.tasks(RECENT_TASKS_SCANNED, None)? {
            if tasks.len() >= RECENT_TASKS_SHOWN {
                break;
            }
            let aimed = match &t.spec.targets {
                Targets::Nodes(ids) => ids.contains(&n),
                Targets::Selector(sel) => agent.matches(sel),
            };
            if aimed
                && let Some(rec) = store.task(t.id)?
                && rec.targets.contains_key(&n)
            {
                tasks.push(rec);
            }
        }
        Ok(Some(AgentView {
            agent,
            pinned,
            reports,
            configs,
            tasks,
        }))
    })
    .await?
    .ok_or_else(|| ConsoleError::NotFound(format!("no agent {node}")))?;
    let revoked = shared.trust.is_revoked(&node);
    let body = render_agent(&view, revoked, &node, &session);
    Ok(page(layout(node.as_str(), Nav::Fleet, &session, &body)))
}

fn render_agent(
    view: &AgentView,
    revoked: bool,
    node: &UserId,
    session: &crate::console::session::Session,
) -> Markup {
    let a = &view.agent;
    html! {
        h1 { "Agent " (node.as_str()) " " (badge(&wire_name(&a.state))) @if revoked { " " (badge("revoked")) } }
        section.split {
            div {
                table.kv {
                    tr { th { "hostname" } td { (a.hostname) } }
                    tr { th { "version" } td { (a.version) } }
                    tr { th { "addresses" } td { (a.addresses.join(", ")) } }
                    tr { th { "registered" } td { (ago(a.registered_at_ms)) } }
                    tr { th { "last seen" } td { (ago(a.last_seen_ms)) } }
                    tr { th { "via relay" } td { (a.via.as_ref().map_or("direct", |v| v.as_str())) } }
                }
                h2 { "Labels" }
                div.chips {
                    @for (k, v) in &a.labels {
                        span.chip { (k) "=" (v) @if view.pinned.contains_key(k) { " 📌" } }
                    }
                }
                h2 { "Config documents" }
                @if view.configs.is_empty() { p.hint { "None targets this agent." } }
                @else {
                    table.compact {
                        thead { tr { th { "document" } th { "desired" } th { "applied" } th { "state" } } }
                        @for (name, s) in &view.configs {
                            tr {
                                td { a href={ "/console/configs/" (super::encode(name)) } { (name) } }
                                td { "v" (s.desired_version) }
                                td { @if let Some(v) = s.applied_version { "v" (v) } @else { "–" } }
                                td { (badge(&wire_name(&s.state))) @if let Some(e) = &s.error { " " span.error { (e) } } }
                            }
                        }
                    }
                }
            }
            div {
                h2 { "Reports" span.hint { " (" (view.reports.len()) " retained)" } }
                div.charts {
                    @for (metric, label, max) in [("cpu_pct", "CPU %", Some(100.0)), ("mem_pct", "memory %", Some(100.0)), ("disk_pct", "disk %", Some(100.0)), ("load1", "load", None)] {
                        (chart(&view.reports, metric, label, max))
                    }
                }
            }
        }
        h2 { "Recent tasks" }
        @if view.tasks.is_empty() { p.hint { "No recent task ran here." } }
        @else {
            table.compact {
                thead { tr { th { "task" } th { "kind" } th { "state here" } th { "attempts" } th { "created" } } }
                @for t in &view.tasks {
                    @let status = t.targets.get(node);
                    tr {
                        td { a href={ "/console/tasks/" (t.id) } { "#" (t.id) } }
                        td { (super::tasks::kind_summary(&t.spec)) }
                        td { @if let Some(s) = status { (badge(&wire_name(&s.state))) } }
                        td { @if let Some(s) = status { (s.attempts) } }
                        td { (ago(t.created_at_ms)) }
                    }
                }
            }
        }
        @if session.can_operate() && !revoked {
            h2 { "Danger zone" }
            form.danger method="post" action={ "/console/agents/" (super::encode(node.as_str())) "/revoke" } {
                (csrf(session))
                button.danger #revoke type="submit" { "Revoke " (node.as_str()) }
                span.hint { " Disconnects it everywhere and refuses it until the revocation is lifted (API)." }
            }
        }
    }
}

/// A small line chart of `metric` over the retained reports, as inline SVG (no script, no
/// style attribute: presentation attributes only, which the CSP allows).
pub fn chart(reports: &[Report], metric: &str, label: &str, max: Option<f64>) -> Markup {
    const W: f64 = 240.0;
    const H: f64 = 60.0;
    let values: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.metrics.get(metric).and_then(serde_json::Value::as_f64))
        .filter(|v| v.is_finite())
        .collect();
    let last = values.last().copied();
    let top = max
        .unwrap_or_else(|| values.iter().copied().fold(1.0, f64::max))
        .max(f64::EPSILON);
    let mut points = String::new();
    let step = if values.len() > 1 {
        W / (values.len() - 1) as f64
    } else {
        0.0
    };
    for (i, v) in values.iter().enumerate() {
        let x = i as f64 * step;
        let y = H - (v / top).clamp(0.0, 1.0) * H;
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    html! {
        figure.chart data-metric=(metric) {
            figcaption { (label) " " strong { @if let Some(v) = last { (format!("{v:.1}")) } @else { "–" } } }
            svg viewBox={ "0 0 " (W) " " (H) } width=(W) height=(H) role="img" aria-label=(label) {
                rect x="0" y="0" width=(W) height=(H) fill="#f6f8fa" {}
                @if values.len() > 1 {
                    polyline points=(points.trim_end()) fill="none" stroke="#0969da" stroke-width="1.5" {}
                } @else if values.len() == 1 {
                    circle cx="2" cy=(format!("{:.1}", H - (values[0] / top).clamp(0.0, 1.0) * H)) r="2" fill="#0969da" {}
                }
            }
        }
    }
}

/// `POST /console/agents/{id}/revoke`: the API's revoke, with the session's key as actor.
pub async fn revoke(
    req: HttpRequest,
    path: web::Path<String>,
    form: Form,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = action_session(&req, &shared, &form)?;
    let node = crate::http::node_id(&path)?;
    crate::http::revoke(&shared, session.actor(), &node).await?;
    Ok(crate::console::redirect(&format!(
        "/console/agents/{}",
        super::encode(node.as_str())
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn agent(i: usize, region: &str, state: AgentState) -> AgentRecord {
        AgentRecord {
            node_id: UserId::new(format!("n{i:05}")).unwrap(),
            hostname: format!("h{i}"),
            version: if i.is_multiple_of(2) { "1.0" } else { "1.1" }.into(),
            labels: [("region".to_owned(), region.to_owned())].into(),
            addresses: vec![],
            registered_at_ms: 0,
            last_seen_ms: 0,
            state,
            via: None,
        }
    }

    #[test]
    fn counts_cover_the_fleet_and_rows_the_filtered_page() {
        let agents: Vec<_> = (0..500usize)
            .map(|i| {
                let region = if i < 300 { "eu" } else { "us" };
                let state = if i.is_multiple_of(10) {
                    AgentState::Offline
                } else {
                    AgentState::Online
                };
                agent(i, region, state)
            })
            .collect();
        let filter = Filter::parse("selector=region%3Deu&page=1").unwrap();
        let view = fleet_view(&agents, &filter);
        assert_eq!(view.total, 500);
        assert_eq!(view.states[&AgentState::Offline], 50);
        assert_eq!(view.versions["1.0"], 250);
        assert_eq!(view.matched, 300);
        assert_eq!(view.rows.len(), 100, "page 2 of 300 at 200 per page");
        assert_eq!(view.labels[0], ("region=eu".to_owned(), 300));
        let html = render_list(&view, &filter).into_string();
        assert!(html.contains("300 of 500 match"), "{html}");
        assert!(Filter::parse("selector=nokey").is_err());
        assert!(Filter::parse("state=sleepy").is_err());
    }

    #[test]
    fn charts_draw_the_reports() {
        let reports: Vec<Report> = (0..5)
            .map(|i| Report {
                message_id: format!("m{i}"),
                node_id: UserId::new("n1").unwrap(),
                received_at_ms: i,
                metrics: serde_json::json!({"cpu_pct": 10.0 * i as f64}),
            })
            .collect();
        let svg = chart(&reports, "cpu_pct", "CPU %", Some(100.0)).into_string();
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(svg.contains("40.0"), "{svg}");
        let empty = chart(&[], "cpu_pct", "CPU %", Some(100.0)).into_string();
        assert!(!empty.contains("polyline"));
    }
}
