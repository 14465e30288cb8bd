//! `loadtest hostile-report`: the verdict of a hostile-clients run (issue 18, item 5) from
//! three files: the normal clients' run without hostile clients (A), the same run with
//! them (B), and the hostile clients' own results. Writes `<out>/<name>.json` and `.html`
//! (B's timeline charts: latency, gateway memory) and checks the thresholds.

use std::path::{Path, PathBuf};

use crate::client::BoxError;
use crate::coordinator::Second;
use crate::report::{self, Row};

/// Arguments of `loadtest hostile-report`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ReportArgs {
    /// Run A's JSON (`loadtest run`, normal clients only).
    #[arg(long)]
    pub baseline: PathBuf,
    /// Run B's JSON (the same normal clients, hostile clients alongside).
    #[arg(long)]
    pub run: PathBuf,
    /// The hostile clients' JSON (`loadtest hostile`).
    #[arg(long)]
    pub clients: PathBuf,
    /// Thresholds (TOML, `[min]` / `[max]` over the summary's keys).
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Directory for the report.
    #[arg(long, default_value = "loadtest-results")]
    pub out: PathBuf,
    /// Report name.
    #[arg(long, default_value = "hostile")]
    pub name: String,
}

fn read_json(path: &Path) -> Result<serde_json::Value, BoxError> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

/// The normal clients' side: latency with and without the hostile ones, losses, memory.
fn normal_rows(a: &serde_json::Value, b: &serde_json::Value) -> (serde_json::Value, Vec<Row>) {
    let ratio = |k: &str| {
        let base = f(a, k);
        if base > 0.0 { f(b, k) / base } else { 0.0 }
    };
    let rss = |v: &serde_json::Value| f(v, "gw1_rss_kib_max") / 1024.0;
    let summary = serde_json::json!({
        "p50_a_ms": f(a, "e2e_p50_ms"), "p50_b_ms": f(b, "e2e_p50_ms"),
        "p99_a_ms": f(a, "e2e_p99_ms"), "p99_b_ms": f(b, "e2e_p99_ms"),
        "p99_ratio": ratio("e2e_p99_ms"), "p50_ratio": ratio("e2e_p50_ms"),
        "normal_lost_a": f(a, "lost"), "normal_lost_b": f(b, "lost"),
        "normal_closed_by_server_b": f(b, "closed_by_server"),
        "gw_rss_mib_max_a": rss(a), "gw_rss_mib_max_b": rss(b),
        "gw_rss_mib_end_b": f(b, "gw1_rss_kib_at_last_push") / 1024.0,
        "gw_rss_growth_mib": rss(b) - rss(a),
        "gw_rss_slope_kib_per_min_last_half_b": f(b, "gw1_rss_slope_kib_per_min_last_half"),
    });
    let rows = vec![
        Row::new(
            "normal clients' delivery p50 / p99, without -> with hostile",
            format!(
                "{:.1} / {:.1} ms -> {:.1} / {:.1} ms (p99 x{:.2})",
                f(a, "e2e_p50_ms"),
                f(a, "e2e_p99_ms"),
                f(b, "e2e_p50_ms"),
                f(b, "e2e_p99_ms"),
                ratio("e2e_p99_ms")
            ),
        ),
        Row::new(
            "normal clients: deliveries lost, closed by the server (B)",
            format!(
                "A {} lost; B {} lost, {} closed",
                f(a, "lost"),
                f(b, "lost"),
                f(b, "closed_by_server")
            ),
        ),
        Row::new(
            "gateway RSS max A -> B, B at the last push",
            format!(
                "{:.1} -> {:.1} MiB, {:.1} MiB (B slope over its last half {:.0} KiB/min)",
                rss(a),
                rss(b),
                f(b, "gw1_rss_kib_at_last_push") / 1024.0,
                f(b, "gw1_rss_slope_kib_per_min_last_half")
            ),
        ),
    ];
    (summary, rows)
}

/// The hostile side: per kind, outcomes against the documented ones.
fn hostile_rows(clients: &serde_json::Value) -> (serde_json::Value, Vec<Row>) {
    let mut rows = Vec::new();
    let (mut unexpected, mut not_cut, mut attempts) = (0.0, 0.0, 0.0);
    let empty = serde_json::Map::new();
    let kinds = clients["kinds"].as_object().unwrap_or(&empty);
    for (kind, t) in kinds {
        unexpected += f(t, "unexpected");
        attempts += f(t, "attempts");
        not_cut += t["outcomes"]["not cut"].as_f64().unwrap_or(0.0);
        rows.push(Row::new(
            format!("hostile {kind}: attempts, outcomes (expected)"),
            format!(
                "{}, {} ({}); cut p50/p99/max {:.0}/{:.0}/{:.0} ms",
                f(t, "attempts"),
                t["outcomes"],
                t["expected"],
                f(t, "cut_p50_ms"),
                f(t, "cut_p99_ms"),
                f(t, "cut_max_ms")
            ),
        ));
    }
    let stalled = &kinds.get("stalled").cloned().unwrap_or_default();
    let stalled_cut = stalled["attempts"].as_f64().unwrap_or(0.0)
        - stalled["outcomes"]["open at the end"]
            .as_f64()
            .unwrap_or(0.0)
        - stalled["outcomes"]["connect error"].as_f64().unwrap_or(0.0);
    let slow = clients["gateway_closes"]["slow_consumer"]
        .as_f64()
        .unwrap_or(0.0);
    rows.push(Row::new(
        "stalled users' feed; machine TCP buffer memory max during B",
        format!(
            "{} pushes of {} B every {} ms; {:.1} MiB",
            clients["stalled_pushes_fed"],
            clients["stalled_feed_bytes"],
            clients["stalled_feed_ms"],
            clients["tcp_mem_max_kib"].as_f64().unwrap_or(0.0) / 1024.0
        ),
    ));
    rows.push(Row::new(
        "gateway closes by reason during B (its /metrics)",
        clients["gateway_closes"].to_string(),
    ));
    let summary = serde_json::json!({
        "hostile_attempts": attempts,
        "hostile_unexpected": unexpected,
        "hostile_not_cut": not_cut,
        "stalled_cut": stalled_cut,
        "stalled_clients": clients["stalled"],
        "stalled_never_cut": clients["stalled_never_cut"],
        "gateway_slow_consumer_closes": slow,
        "tcp_mem_max_mib": clients["tcp_mem_max_kib"].as_f64().unwrap_or(0.0) / 1024.0,
    });
    (summary, rows)
}

/// Builds, prints and writes the report; returns whether every threshold held.
pub(crate) fn run(args: &ReportArgs) -> Result<bool, BoxError> {
    let a = read_json(&args.baseline)?;
    let b = read_json(&args.run)?;
    let clients = read_json(&args.clients)?;
    let (mut summary, mut rows) = normal_rows(&a["summary"], &b["summary"]);
    let (hostile, mut more) = hostile_rows(&clients);
    if let (Some(s), Some(h)) = (summary.as_object_mut(), hostile.as_object()) {
        s.extend(h.clone());
    }
    rows.append(&mut more);
    summary["name"] = args.name.clone().into();
    summary["clients"] = clients;
    let ok = report::apply_thresholds(args.thresholds.as_deref(), &mut summary, &mut rows)?;
    let timeline: Vec<Second> = serde_json::from_value(b["timeline"].clone()).unwrap_or_default();
    report::print_table(&args.name, &rows);
    let files = report::write(&args.out, &args.name, &summary, &rows, &timeline)?;
    println!("results: {}", files.join(", "));
    Ok(ok)
}
