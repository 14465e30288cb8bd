//! Results of a multi-process run: the human summary table, the JSON file, the threshold
//! check against a scenario's `thresholds.toml`, and the HTML report whose charts
//! (throughput and latency over time, server memory and CPU) are drawn with `plotters`
//! into SVG and embedded.

use std::path::Path;

use plotters::prelude::*;

use crate::client::BoxError;
use crate::coordinator::Second;

/// One line of the summary table.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Row {
    /// What.
    pub label: String,
    /// Value, formatted.
    pub value: String,
}

impl Row {
    /// A row.
    pub(crate) fn new(label: impl Into<String>, value: impl Into<String>) -> Self {
        Row {
            label: label.into(),
            value: value.into(),
        }
    }
}

/// Prints the summary table.
pub(crate) fn print_table(name: &str, rows: &[Row]) {
    let width = rows.iter().map(|r| r.label.len()).max().unwrap_or(10);
    println!("== {name}");
    for r in rows {
        println!("  {:<width$}  {}", r.label, r.value);
    }
}

/// Checks `[min]` / `[max]` bounds over numeric summary keys; returns whether all held and
/// one row per bound.
/// Checks `summary` against the thresholds file, if there is one: its rows go to `rows`,
/// the verdict into `summary["thresholds_ok"]`; true when every threshold holds (or none
/// was given).
pub(crate) fn apply_thresholds(
    path: Option<&Path>,
    summary: &mut serde_json::Value,
    rows: &mut Vec<Row>,
) -> Result<bool, BoxError> {
    let Some(path) = path else {
        return Ok(true);
    };
    let (ok, mut checks) = check_thresholds(path, summary)?;
    rows.append(&mut checks);
    summary["thresholds_ok"] = ok.into();
    Ok(ok)
}

pub(crate) fn check_thresholds(
    path: &Path,
    summary: &serde_json::Value,
) -> Result<(bool, Vec<Row>), BoxError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("thresholds {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)?;
    let mut ok = true;
    let mut rows = Vec::new();
    for (section, is_min) in [("min", true), ("max", false)] {
        let Some(bounds) = table.get(section).and_then(|v| v.as_table()) else {
            continue;
        };
        for (key, bound) in bounds {
            let bound = bound
                .as_float()
                .or_else(|| bound.as_integer().map(|i| i as f64))
                .ok_or_else(|| format!("thresholds: {section}.{key} is not a number"))?;
            let value = summary[key.as_str()].as_f64().or_else(|| {
                summary[key.as_str()]
                    .as_bool()
                    .map(|b| if b { 1.0 } else { 0.0 })
            });
            let pass = match value {
                Some(v) if is_min => v >= bound,
                Some(v) => v <= bound,
                None => false,
            };
            ok &= pass;
            let op = if is_min { ">=" } else { "<=" };
            rows.push(Row::new(
                format!("threshold {key} {op} {bound}"),
                format!(
                    "{} ({})",
                    if pass { "PASS" } else { "FAIL" },
                    value.map_or("missing".to_owned(), |v| format!("{v:.2}"))
                ),
            ));
        }
    }
    Ok((ok, rows))
}

/// Writes `<dir>/<name>.json` and `<dir>/<name>.html`; returns their paths.
pub(crate) fn write(
    dir: &Path,
    name: &str,
    summary: &serde_json::Value,
    rows: &[Row],
    seconds: &[Second],
) -> Result<Vec<String>, BoxError> {
    std::fs::create_dir_all(dir)?;
    let json_path = dir.join(format!("{name}.json"));
    let doc = serde_json::json!({
        "summary": summary,
        "table": rows,
        "timeline": seconds,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    let html_path = dir.join(format!("{name}.html"));
    std::fs::write(&html_path, html(name, summary, rows, seconds)?)?;
    Ok(vec![
        json_path.display().to_string(),
        html_path.display().to_string(),
    ])
}

type Series = (String, Vec<(f64, f64)>);

fn html(
    name: &str,
    summary: &serde_json::Value,
    rows: &[Row],
    seconds: &[Second],
) -> Result<String, BoxError> {
    let mut charts = Vec::new();
    let pts = |f: &dyn Fn(&Second) -> f64| -> Vec<(f64, f64)> {
        seconds.iter().map(|s| (s.t as f64, f(s))).collect()
    };
    charts.push(chart(
        "Open connections",
        "connections",
        &[("open".into(), pts(&|s| s.open as f64))],
    )?);
    charts.push(chart(
        "Connects and errors per second",
        "per second",
        &[
            ("connects/s".into(), pts(&|s| s.connects as f64)),
            ("errors/s".into(), pts(&|s| s.connect_errors as f64)),
            ("closed/s".into(), pts(&|s| s.closed as f64)),
            ("churned/s".into(), pts(&|s| s.churned as f64)),
        ],
    )?);
    charts.push(chart(
        "Handshake latency (TCP connect to welcome)",
        "ms",
        &[
            ("p50".into(), pts(&|s| s.hs_p50_ms)),
            ("p99".into(), pts(&|s| s.hs_p99_ms)),
        ],
    )?);
    charts.push(chart(
        "Throughput",
        "per second",
        &[
            ("pushes received/s".into(), pts(&|s| s.recv as f64)),
            ("acks sent/s".into(), pts(&|s| s.acks as f64)),
            ("tasks received/s".into(), pts(&|s| s.tasks as f64)),
            ("results sent/s".into(), pts(&|s| s.results as f64)),
            ("result acks/s".into(), pts(&|s| s.result_acks as f64)),
        ],
    )?);
    charts.push(chart(
        "End-to-end push latency (publisher stamp to client)",
        "ms",
        &[
            ("p50".into(), pts(&|s| s.lat_p50_ms)),
            ("p99".into(), pts(&|s| s.lat_p99_ms)),
            ("max".into(), pts(&|s| s.lat_max_ms)),
        ],
    )?);
    charts.push(chart(
        "Results stored at the scheduler",
        "results",
        &[(
            "stored".into(),
            seconds
                .iter()
                .filter_map(|s| s.stored.map(|v| (s.t as f64, v as f64)))
                .collect(),
        )],
    )?);
    let names: Vec<String> = seconds
        .iter()
        .flat_map(|s| s.procs.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let rss: Vec<Series> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                seconds
                    .iter()
                    .filter_map(|s| {
                        s.procs
                            .get(n)
                            .map(|(r, _)| (s.t as f64, *r as f64 / 1024.0))
                    })
                    .collect(),
            )
        })
        .collect();
    charts.push(chart("Server resident memory", "MiB", &rss)?);
    let cpu: Vec<Series> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                seconds
                    .iter()
                    .filter_map(|s| s.procs.get(n).map(|(_, c)| (s.t as f64, *c)))
                    .collect(),
            )
        })
        .collect();
    charts.push(chart("Server CPU (% of one core)", "%", &cpu)?);

    let mut out = String::new();
    out.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>");
    out.push_str(&escape(name));
    out.push_str("</title><style>body{font-family:sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse}td{border:1px solid #ccc;padding:4px 8px}pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>");
    out.push_str(&format!("<h1>loadtest: {}</h1>", escape(name)));
    out.push_str("<table>");
    for r in rows {
        out.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(&r.label),
            escape(&r.value)
        ));
    }
    out.push_str("</table>");
    for c in charts.into_iter().flatten() {
        out.push_str("<div>");
        out.push_str(&c);
        out.push_str("</div>");
    }
    out.push_str("<h2>Summary (JSON)</h2><pre>");
    let mut brief = summary.clone();
    if let Some(o) = brief.as_object_mut() {
        o.remove("pushes");
        o.remove("api_receipts");
    }
    out.push_str(&escape(&serde_json::to_string_pretty(&brief)?));
    out.push_str("</pre></body></html>\n");
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line chart as an SVG string; `None` when every series is empty or all zero.
fn chart(title: &str, y_label: &str, series: &[Series]) -> Result<Option<String>, BoxError> {
    let series: Vec<&Series> = series
        .iter()
        .filter(|(_, p)| p.iter().any(|(_, y)| *y != 0.0))
        .collect();
    if series.is_empty() {
        return Ok(None);
    }
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0, f64::max)
        * 1.1;
    let y_max = if y_max > 0.0 { y_max } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(Some(svg))
}
