//! The Config pages: every config document with its desired and latest version and how many
//! nodes run it, and one document's page: its version history, a line diff between two
//! versions (by default the desired one and the one before), and who runs what (each
//! target node's desired and applied version and state), from the store queries behind
//! `/v1/configs`.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use maud::{Markup, html};

use super::{Nav, ago, badge, layout, wire_name};
use crate::Shared;
use crate::bus::blocking;
use crate::console::{ConsoleError, page, page_session};
use crate::store::{ConfigNodeStatus, ConfigRecord, ConfigState, ConfigVersion};

/// Lines per side above which no diff is computed: the table is quadratic (4 MB of `u32`
/// at this bound, per request).
const MAX_DIFF_LINES: usize = 1000;

/// `GET /console/configs`
pub async fn list(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let rows = blocking(&shared, |store| {
        let mut rows = Vec::new();
        for c in store.configs()? {
            let (_, nodes) = store.config_status(&c.name)?;
            rows.push((c, nodes));
        }
        Ok(rows)
    })
    .await?;
    let body = html! {
        h1 { "Config documents" }
        @if rows.is_empty() { p.hint { "No config document yet (schedctl config set, or PUT /v1/configs/{name})." } }
        @else {
            table #configs {
                thead { tr { th { "document" } th { "desired" } th { "latest" } th { "nodes" } th { "applied" } th { "pending" } th { "failed" } th { "updated" } } }
                tbody {
                    @for (c, nodes) in &rows {
                        @let count = |s: ConfigState| nodes.iter().filter(|n| n.state == s).count();
                        tr {
                            td { a href={ "/console/configs/" (super::encode(&c.name)) } { (c.name) } }
                            td { "v" (c.desired) }
                            td { "v" (c.latest) }
                            td { (nodes.len()) }
                            td { (count(ConfigState::Applied)) }
                            td { (count(ConfigState::Pending)) }
                            td { (count(ConfigState::Failed)) }
                            td { (ago(c.updated_at_ms)) }
                        }
                    }
                }
            }
        }
    };
    Ok(page(layout("Config", Nav::Configs, &session, &body)))
}

/// `GET /console/configs/{name}?from=<v>&to=<v>`
pub async fn config(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ConsoleError> {
    let session = page_session(&req, &shared)?;
    let name = path.into_inner();
    let pairs = servicekit::query::pairs(req.query_string())
        .map_err(|e| ConsoleError::Bad(format!("query: {e}")))?;
    let version = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.trim_start_matches('v').parse::<u64>().ok())
    };
    let (from, to) = (version("from"), version("to"));
    let n = name.clone();
    let found = blocking(&shared, move |store| {
        let Some(record) = store.config(&n)? else {
            return Ok(None);
        };
        let history = store.config_history(&n)?;
        let (_, nodes) = store.config_status(&n)?;
        Ok(Some((record, history, nodes)))
    })
    .await?;
    let (record, history, nodes) =
        found.ok_or_else(|| ConsoleError::NotFound(format!("no config document {name:?}")))?;
    let to = to.unwrap_or(record.desired);
    let from = from.unwrap_or(to.saturating_sub(1));
    let body = render(&record, &history, &nodes, from, to);
    Ok(page(layout(&name, Nav::Configs, &session, &body)))
}

fn render(
    record: &ConfigRecord,
    history: &[ConfigVersion],
    nodes: &[ConfigNodeStatus],
    from: u64,
    to: u64,
) -> Markup {
    let find = |v: u64| history.iter().find(|h| h.version == v);
    html! {
        h1 { "Config " (record.name) }
        table.kv {
            tr { th { "desired" } td { "v" (record.desired) } }
            tr { th { "latest" } td { "v" (record.latest) } }
            tr { th { "targets" } td { (crate::http::targets_json(&record.targets).to_string()) } }
        }
        h2 { "Versions" }
        table.compact #versions {
            thead { tr { th { "version" } th { "by" } th { "created" } th { "size" } th {} } }
            @for h in history.iter().rev() {
                tr class=[(h.version == record.desired).then_some("current")] {
                    td { "v" (h.version) @if h.version == record.desired { " (desired)" } }
                    td { (h.actor) }
                    td { (ago(h.created_at_ms)) }
                    td { (h.content.len()) " B" }
                    td { @if h.version > 1 {
                        a href={ "/console/configs/" (super::encode(&record.name)) "?from=" (h.version - 1) "&to=" (h.version) } { "diff with v" (h.version - 1) }
                    } }
                }
            }
        }
        h2 { "Diff v" (from) " → v" (to) }
        @match (find(from), find(to)) {
            (Some(a), Some(b)) => (diff_view(&a.content, &b.content)),
            (None, Some(b)) => { p.hint { "v" (from) " is not kept; the whole of v" (to) ":" } (diff_view(&[], &b.content)) },
            _ => p.hint { "v" (to) " is not kept." },
        }
        h2 { "Who runs what" }
        table #config-nodes {
            thead { tr { th { "node" } th { "should run" } th { "runs" } th { "state" } th { "updated" } } }
            tbody {
                @for n in nodes {
                    tr {
                        td { a href={ "/console/agents/" (super::encode(&n.node_id)) } { (n.node_id) } }
                        td { "v" (n.desired_version) }
                        td { @if let Some(v) = n.applied_version { "v" (v) } @else { "–" } }
                        td { (badge(&wire_name(&n.state))) @if let Some(e) = &n.error { " " span.error { (e) } } }
                        td { @if let Some(at) = n.updated_at_ms { (ago(at)) } }
                    }
                }
            }
        }
    }
}

/// One line of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line<'a> {
    /// In both.
    Same(&'a str),
    /// Only in the old version.
    Removed(&'a str),
    /// Only in the new version.
    Added(&'a str),
}

/// A line diff of `old` and `new` (longest common subsequence); `None` when either has
/// more than [`MAX_DIFF_LINES`] lines.
pub fn diff<'a>(old: &'a str, new: &'a str) -> Option<Vec<Line<'a>>> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len() > MAX_DIFF_LINES || b.len() > MAX_DIFF_LINES {
        return None;
    }
    // lcs[i][j]: common lines of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(Line::Same(a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(Line::Added(b[j]));
            j += 1;
        } else {
            out.push(Line::Removed(a[i]));
            i += 1;
        }
    }
    Some(out)
}

fn diff_view(old: &[u8], new: &[u8]) -> Markup {
    let (old, new) = (String::from_utf8_lossy(old), String::from_utf8_lossy(new));
    match diff(&old, &new) {
        None => html! { p.hint { "Too large to diff here." } },
        Some(lines) => html! {
            pre.diff {
                @for l in lines {
                    @match l {
                        Line::Same(t) => span.same { "  " (t) "\n" },
                        Line::Removed(t) => span.del { "- " (t) "\n" },
                        Line::Added(t) => span.add { "+ " (t) "\n" },
                    }
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_keep_common_lines() {
        let d = diff("a\nb\nc\n", "a\nc\nd\n").unwrap_or_default();
        assert_eq!(
            d,
            vec![
                Line::Same("a"),
                Line::Removed("b"),
                Line::Same("c"),
                Line::Added("d")
            ]
        );
        assert_eq!(diff("", "x").unwrap_or_default(), vec![Line::Added("x")]);
        let big = "x\n".repeat(MAX_DIFF_LINES + 1);
        assert!(diff(&big, "").is_none());
    }
}
