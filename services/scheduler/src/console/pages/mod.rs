//! The console's pages: the shared layout (top navigation, who is logged in, logout) and
//! small rendering helpers; one module per area with its handlers. Handlers read through
//! the store queries the `/v1` API uses and act through the API's own functions.
//! Everything is rendered with `maud`, which escapes every interpolated value.

pub mod configs;
pub mod fleet;
pub mod gateways;
pub mod rollouts;
pub mod tasks;

use maud::{DOCTYPE, Markup, html};
use servicekit::clock::now_ms;

use super::session::Session;

/// The sections of the top navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// Agents.
    Fleet,
    /// Tasks.
    Tasks,
    /// Rollouts.
    Rollouts,
    /// Config documents.
    Configs,
    /// Gateway replicas.
    Gateways,
}

const NAV: [(Nav, &str, &str); 5] = [
    (Nav::Fleet, "/console/fleet", "Fleet"),
    (Nav::Tasks, "/console/tasks", "Tasks"),
    (Nav::Rollouts, "/console/rollouts", "Rollouts"),
    (Nav::Configs, "/console/configs", "Config"),
    (Nav::Gateways, "/console/gateways", "Gateways"),
];

/// A whole page: head, top navigation, `body`.
pub fn layout(title: &str, nav: Nav, session: &Session, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · scheduler console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/console/fleet" { "scheduler" }
                    nav {
                        @for (item, href, label) in NAV {
                            a href=(href) class=[(item == nav).then_some("active")] { (label) }
                        }
                    }
                    div.who {
                        span.key { (session.key_name) }
                        span class={ "scope scope-" (session.scope.as_str()) } { (session.scope.as_str()) }
                        form method="post" action="/console/logout" {
                            (csrf(session))
                            button.link type="submit" { "Log out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The hidden CSRF field every form carries.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// The login form, with an error line after a failed attempt.
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Log in · scheduler console" }
                link rel="stylesheet" href="/console/assets/console.css";
            }
            body {
                main.narrow {
                    h1 { "Scheduler console" }
                    form.login method="post" action="/console/login" {
                        label for="key" { "API key" }
                        input #key type="password" name="key" autocomplete="off" required autofocus;
                        button type="submit" { "Log in" }
                    }
                    @if let Some(e) = error { p.error #login-error { (e) } }
                    p.hint { "Any key from SCHEDULER_API_KEYS. Read keys see everything and change nothing." }
                }
            }
        }
    }
}

/// How long ago `at_ms` was, shortly ("5s ago", "3m ago", "2h ago", "4d ago").
pub fn ago(at_ms: u64) -> String {
    let secs = now_ms().saturating_sub(at_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// A state as a coloured badge (the class names the state).
pub fn badge(state: &str) -> Markup {
    html! { span class={ "badge s-" (state) } { (state) } }
}

/// The wire name of a serde enum value (`"online"`, `"timed_out"`).
pub fn wire_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Links to the pages of a paged list: previous/next, keeping the filters in `query`.
pub fn pager(base: &str, query: &str, page: usize, has_more: bool) -> Markup {
    let sep = if query.is_empty() { "" } else { "&" };
    html! {
        nav.pager {
            @if page > 0 {
                a href={ (base) "?" (query) (sep) "page=" (page - 1) } { "← previous" }
            }
            span { "page " (page + 1) }
            @if has_more {
                a href={ (base) "?" (query) (sep) "page=" (page + 1) } { "next →" }
            }
        }
    }
}

/// A query string from pairs, percent-encoded.
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but unreserved characters.
pub fn encode(s: &str) -> String {
    use std::fmt::Write as _;
    s.bytes()
        .fold(String::with_capacity(s.len()), |mut out, b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_encoded_and_skip_empty_values() {
        assert_eq!(
            query_string(&[("selector", "region=eu,role=web"), ("state", "")]),
            "selector=region%3Deu%2Crole%3Dweb"
        );
        assert_eq!(encode("<a&b>"), "%3Ca%26b%3E");
    }

    #[test]
    fn rendered_values_are_escaped() {
        let page = login(Some("<script>alert(1)</script>")).into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
    }
}
