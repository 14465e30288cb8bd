//! Memory trend of the gateways over a long run (the soak, the hostile-client run): a
//! least-squares line through the per-second RSS samples after a warm-up, its slope per
//! minute, the growth per reconnect (the churn is what a leak per connection would show
//! on), the same slope over the last half of the window (a settling allocator flattens
//! there, a leak does not), the maximum and the end, and a sample every five minutes.
//!
//! The window runs from `warmup` seconds after the start to the last second with a push
//! (the connections are closed after it, which frees memory and would bend the line).

use crate::coordinator::Second;
use crate::report::Row;

/// Seconds between the samples listed in the report.
const SAMPLE_EVERY: usize = 300;

/// The window `[from, to]` of seconds to fit: after the warm-up, up to the last push (or
/// the last second when the run published nothing).
fn window(seconds: &[Second], warmup: u64) -> Option<(usize, usize)> {
    let to = seconds
        .iter()
        .rposition(|s| s.pushes > 0)
        .or_else(|| seconds.len().checked_sub(1))?;
    let from = usize::try_from(warmup).ok()?;
    (from < to).then_some((from, to))
}

/// Least-squares slope of `(t, y)` points, y per second.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// RSS samples (t, KiB) of process `name` over `seconds[from..=to]`; seconds without a
/// sample (the sampler skipped one) are left out.
fn samples(seconds: &[Second], name: &str, from: usize, to: usize) -> Vec<(f64, f64)> {
    seconds[from..=to]
        .iter()
        .filter_map(|s| {
            let (rss, _) = s.procs.get(name)?;
            (*rss > 0).then_some((s.t as f64, *rss as f64))
        })
        .collect()
}

/// Adds the trend of every gateway in `names` to the summary (`<name>_rss_*` keys, and
/// `rss_kib_per_reconnect` / `rss_slope_kib_per_min` for the first) and the table.
pub(crate) fn add(
    seconds: &[Second],
    warmup: u64,
    names: &[String],
    summary: &mut serde_json::Value,
    rows: &mut Vec<Row>,
) {
    let Some((from, to)) = window(seconds, warmup) else {
        rows.push(Row::new(
            "RSS trend",
            format!("no window: the run ended before the {warmup} s warm-up"),
        ));
        return;
    };
    let reconnects: u64 = seconds[from..=to].iter().map(|s| s.churned).sum();
    let peak = |name: &str| {
        seconds
            .iter()
            .filter_map(|s| s.procs.get(name).map(|p| p.0))
            .max()
    };
    for (i, name) in names.iter().enumerate() {
        let points = samples(seconds, name, from, to);
        let (Some(per_s), Some(first), Some(last)) =
            (slope(&points), points.first(), points.last())
        else {
            continue;
        };
        let late = slope(&points[points.len() / 2..]).unwrap_or(0.0);
        let span = last.0 - first.0;
        let per_reconnect = (reconnects > 0).then(|| per_s * span / reconnects as f64);
        let key = name.replace('-', "_");
        summary[format!("{key}_rss_kib_at_warmup")] = first.1.into();
        summary[format!("{key}_rss_kib_at_last_push")] = last.1.into();
        summary[format!("{key}_rss_kib_max")] = peak(name).into();
        summary[format!("{key}_rss_slope_kib_per_min")] = (per_s * 60.0).into();
        summary[format!("{key}_rss_slope_kib_per_min_last_half")] = (late * 60.0).into();
        summary[format!("{key}_rss_kib_per_reconnect")] = per_reconnect.into();
        if i == 0 {
            summary["rss_slope_kib_per_min"] = (per_s * 60.0).into();
            summary["rss_kib_per_reconnect"] = per_reconnect.unwrap_or(0.0).into();
            summary["rss_window_secs"] = span.into();
            summary["rss_window_reconnects"] = reconnects.into();
        }
        rows.push(Row::new(
            format!("{name} RSS after warm-up (t={from}..{to} s)"),
            format!(
                "{:.1} -> {:.1} MiB, max {:.1} MiB; slope {:.1} KiB/min ({:.1} over the last half); {} reconnects, {} KiB per reconnect",
                first.1 / 1024.0,
                last.1 / 1024.0,
                peak(name).unwrap_or(0) as f64 / 1024.0,
                per_s * 60.0,
                late * 60.0,
                reconnects,
                per_reconnect.map_or("n/a".to_owned(), |k| format!("{k:.3}")),
            ),
        ));
        let listed: Vec<String> = points
            .iter()
            .step_by(SAMPLE_EVERY)
            .chain(
                points
                    .last()
                    .filter(|_| !(points.len() - 1).is_multiple_of(SAMPLE_EVERY)),
            )
            .map(|(t, kib)| format!("{t:.0}s {:.1}", kib / 1024.0))
            .collect();
        rows.push(Row::new(
            format!("{name} RSS samples, MiB"),
            listed.join(", "),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_is_its_gradient() {
        let points: Vec<(f64, f64)> = (0..100).map(|t| (t as f64, 3.0 * t as f64 + 7.0)).collect();
        let s = slope(&points).unwrap_or(0.0);
        assert!((s - 3.0).abs() < 1e-9);
        assert_eq!(slope(&points[..1]), None);
    }
}
