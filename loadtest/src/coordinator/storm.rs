//! Scenario 1, the connect storm (`--scenario storm`): every connection opens at the
//! target rate, is held, then closed; it measures connects per second, handshake latency,
//! errors and server memory per connection. With `--reconnect` it also owns the recovery
//! after a fault (a gateway killed during the hold): time until every connection is back,
//! each connection's loss -> welcome time and the reconnects per second, read off the
//! run's per-second record ([`recover`], also used by the fleet's gateway-loss mode).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Agg, Done, Driven, Run, Second, proc_rows};
use crate::hist::Hist;
use crate::report::Row;
use crate::worker::WorkerLine;

/// Everything opens at the target rate, is held, then closed.
pub(super) async fn storm(run: &Run) -> Driven {
    let t0 = Instant::now();
    let all = run.wait_opened(run.remaining()).await;
    let open_secs = run
        .agg()
        .open_secs()
        .unwrap_or_else(|| t0.elapsed().as_secs_f64());
    let hold = Duration::from_secs(run.args.hold_secs).min(run.remaining());
    tokio::time::sleep(hold).await;
    let recovery = if run.args.reconnect {
        Some(recover(run).await)
    } else {
        None
    };
    let opened = {
        let agg = run.agg();
        let peak = agg.seconds.iter().map(|s| s.connects).max().unwrap_or(0);
        Opened {
            all,
            open: agg.open_now(),
            open_secs,
            totals: agg.totals.clone(),
            hs: agg.hs.clone(),
            peak,
        }
    };
    let mut summary = storm_summary(run, &opened);
    let mut rows = storm_rows(run, &opened);
    if let Some((extra, extra_rows)) = recovery {
        merge(&mut summary, &extra);
        rows.extend(extra_rows);
    }
    proc_rows(run, &mut summary, &mut rows, opened.open);
    Ok(Done::Ready(summary, rows))
}

/// What the opening phase and the hold left behind.
struct Opened {
    all: bool,
    open: u64,
    open_secs: f64,
    totals: WorkerLine,
    hs: Hist,
    /// Most connects in one second.
    peak: u64,
}

impl Opened {
    fn connects_per_sec(&self) -> f64 {
        self.totals.connects as f64 / self.open_secs.max(1e-3)
    }
}

fn storm_summary(run: &Run, o: &Opened) -> Value {
    json!({
        "all_opened": o.all,
        "connections_open": o.open,
        "connects": o.totals.connects,
        "connect_errors": o.totals.connect_errors,
        "closed_by_server": o.totals.closed,
        "open_secs": o.open_secs,
        "connects_per_sec": o.connects_per_sec(),
        "connects_per_sec_peak": o.peak,
        "target_rate": run.args.rate,
        "handshake_p50_ms": o.hs.ms(50.0),
        "handshake_p99_ms": o.hs.ms(99.0),
        "handshake_max_ms": o.hs.ms(100.0),
    })
}

fn storm_rows(run: &Run, o: &Opened) -> Vec<Row> {
    vec![
        Row::new(
            "connections open / target",
            format!("{} / {}", o.open, run.connections),
        ),
        Row::new(
            "connect errors, server closes",
            format!("{}, {}", o.totals.connect_errors, o.totals.closed),
        ),
        Row::new(
            "time to open all",
            format!("{:.2} s (target rate {}/s)", o.open_secs, run.args.rate),
        ),
        Row::new(
            "connects/s (mean, peak second)",
            format!("{:.0}, {}", o.connects_per_sec(), o.peak),
        ),
        Row::new(
            "handshake p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                o.hs.ms(50.0),
                o.hs.ms(99.0),
                o.hs.ms(100.0)
            ),
        ),
    ]
}

/// Adds `extra`'s keys to `summary` (both JSON objects).
pub(super) fn merge(summary: &mut Value, extra: &Value) {
    if let (Some(s), Some(e)) = (summary.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
}

/// After the hold (during which a fault script killed a gateway): waits up to
/// `--recover-secs` for every connection to be back, then reads the recovery off the
/// per-second record: the first second with connections missing, the first one after it
/// with all back, the reconnects per second in between, and each connection's loss ->
/// welcome time. "Every connection" is every one that opened: a first attempt that failed
/// is a connect error of the opening, not a connection lost by the fault.
pub(super) async fn recover(run: &Run) -> (Value, Vec<Row>) {
    let until = Instant::now() + Duration::from_secs(run.args.recover_secs).min(run.remaining());
    let total = held(&run.agg().seconds, run.connections as u64);
    while Instant::now() < until && run.agg().open_now() < total {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The workers report once a second: let the last second land.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let recovery = Recovery::read(&run.agg(), total);
    (recovery.summary(), recovery.rows())
}

/// The recovery as the per-second record shows it.
struct Recovery {
    /// Connects per second from the loss to all back (or to the end).
    per_second: Vec<u64>,
    /// Peak over the mean of the seconds with any connect.
    peak_over_mean: f64,
    rc: Hist,
    reconnects: u64,
    lowest: u64,
    closed: u64,
    all_back: bool,
    secs_to_all_back: Option<u64>,
}

impl Recovery {
    fn read(agg: &Agg, total: u64) -> Recovery {
        let seconds = &agg.seconds;
        let (lost, back) = loss_window(seconds, total);
        let per_second: Vec<u64> = match (lost, back) {
            (Some(d), Some(b)) => seconds[d..=b].iter().map(|s| s.connects).collect(),
            (Some(d), None) => seconds[d..].iter().map(|s| s.connects).collect(),
            _ => Vec::new(),
        };
        let lowest = lost
            .map(|d| {
                seconds[d..]
                    .iter()
                    .filter(|s| reported(s))
                    .map(|s| s.open)
                    .min()
                    .unwrap_or(0)
            })
            .unwrap_or(total);
        Recovery {
            peak_over_mean: peak_over_mean(&per_second),
            per_second,
            rc: agg.rc.clone(),
            reconnects: agg.totals.reconnects,
            lowest,
            closed: agg.totals.closed,
            all_back: back.is_some(),
            secs_to_all_back: match (lost, back) {
                (Some(d), Some(b)) => Some((b - d) as u64),
                _ => None,
            },
        }
    }

    fn summary(&self) -> Value {
        json!({
            "lost_connections": self.closed,
            "lowest_open_in_a_second": self.lowest,
            "reconnects": self.reconnects,
            "all_back": self.all_back,
            "seconds_to_all_back": self.secs_to_all_back,
            "reconnect_p50_ms": self.rc.ms(50.0),
            "reconnect_p99_ms": self.rc.ms(99.0),
            "reconnect_max_ms": self.rc.ms(100.0),
            "reconnects_per_second": self.per_second,
            "reconnects_peak_over_mean": self.peak_over_mean,
        })
    }

    fn rows(&self) -> Vec<Row> {
        vec![
            Row::new(
                "connections lost, reconnected, fewest open in a second",
                format!("{}, {}, {}", self.closed, self.reconnects, self.lowest),
            ),
            Row::new(
                "loss -> all back",
                self.secs_to_all_back
                    .map_or("NOT ALL BACK".to_owned(), |s| {
                        format!("within {s} s (1 s resolution)")
                    }),
            ),
            Row::new(
                "loss -> welcome per connection p50 / p99 / max",
                format!(
                    "{:.0} / {:.0} / {:.0} ms",
                    self.rc.ms(50.0),
                    self.rc.ms(99.0),
                    self.rc.ms(100.0)
                ),
            ),
            Row::new(
                "reconnects per second (from the loss)",
                format!(
                    "{:?}, peak/mean {:.2}",
                    self.per_second, self.peak_over_mean
                ),
            ),
        ]
    }
}

/// The most connections open in any second, at most `target`: what the run held once its
/// opening was over.
fn held(seconds: &[Second], target: u64) -> u64 {
    seconds
        .iter()
        .map(|s| s.open)
        .max()
        .unwrap_or(0)
        .min(target)
}

/// Whether any worker line or sample landed in the second: a parent starved of CPU skips
/// seconds, which stay all zero and must not read as every connection gone (connections
/// cannot drop to none without closes being counted).
fn reported(s: &Second) -> bool {
    s.open > 0 || s.connects > 0 || s.closed > 0 || s.connect_errors > 0
}

/// The first second with connections lost after all were open, and the first one from it
/// with all back. A loss is a second with connections missing or with any closed: a small
/// fleet can lose and regain its connections within one worker report, and then no second
/// shows fewer open. Seconds nothing was reported in are skipped.
fn loss_window(seconds: &[Second], total: u64) -> (Option<usize>, Option<usize>) {
    let first_at = |from: usize, pred: &dyn Fn(&Second) -> bool| {
        seconds
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, s)| pred(s))
            .map(|(i, _)| i)
    };
    let opened_at = first_at(0, &|s| s.open >= total);
    let lost =
        opened_at.and_then(|o| first_at(o, &|s| reported(s) && (s.open < total || s.closed > 0)));
    let back = lost.and_then(|d| first_at(d, &|s| s.open >= total));
    (lost, back)
}

/// The busiest second over the mean of the seconds with any connect (0 when none).
fn peak_over_mean(per_second: &[u64]) -> f64 {
    let busy: Vec<u64> = per_second.iter().copied().filter(|c| *c > 0).collect();
    if busy.is_empty() {
        return 0.0;
    }
    let mean = busy.iter().sum::<u64>() as f64 / busy.len() as f64;
    let peak = busy.iter().copied().max().unwrap_or(0);
    peak as f64 / mean
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(t: u64, open: u64, connects: u64, closed: u64) -> Second {
        Second {
            t,
            open,
            connects,
            closed,
            ..Second::default()
        }
    }

    #[test]
    fn a_loss_seen_as_fewer_open_ends_at_the_first_second_with_all_back() {
        let seconds = [
            second(0, 0, 0, 0),
            second(1, 100, 100, 0),
            second(2, 100, 0, 0),
            second(3, 60, 0, 40),
            second(4, 90, 30, 0),
            second(5, 100, 10, 0),
        ];
        assert_eq!(loss_window(&seconds, 100), (Some(3), Some(5)));
    }

    #[test]
    fn a_loss_regained_within_one_report_still_counts_as_a_loss() {
        // 40 lost and 40 back inside second 3: no second shows fewer than 100 open.
        let seconds = [
            second(0, 0, 0, 0),
            second(1, 100, 100, 0),
            second(2, 100, 0, 0),
            second(3, 100, 40, 40),
            second(4, 100, 0, 0),
        ];
        assert_eq!(loss_window(&seconds, 100), (Some(3), Some(3)));
    }

    #[test]
    fn a_second_the_parent_skipped_is_not_a_loss() {
        // Second 3 got no worker line (the parent was starved): all zero, not 0 open.
        let seconds = [
            second(0, 0, 0, 0),
            second(1, 100, 100, 0),
            second(2, 100, 0, 0),
            Second {
                t: 3,
                ..Second::default()
            },
            second(4, 100, 0, 0),
            second(5, 70, 0, 30),
            second(6, 100, 30, 0),
        ];
        assert_eq!(loss_window(&seconds, 100), (Some(5), Some(6)));
    }

    #[test]
    fn connections_that_never_opened_are_not_waited_for() {
        // 24 first attempts refused: the run held 76, lost 30 of them, got them back.
        let seconds = [
            second(0, 0, 0, 0),
            second(1, 76, 76, 0),
            second(2, 46, 0, 30),
            second(3, 76, 30, 0),
        ];
        let total = held(&seconds, 100);
        assert_eq!(total, 76);
        assert_eq!(loss_window(&seconds, total), (Some(2), Some(3)));
        assert_eq!(held(&seconds, 50), 50);
    }

    #[test]
    fn no_loss_no_window_and_no_storm_measure() {
        let seconds = [
            second(0, 50, 50, 0),
            second(1, 100, 50, 0),
            second(2, 100, 0, 0),
        ];
        assert_eq!(loss_window(&seconds, 100), (None, None));
        assert!(peak_over_mean(&[]).abs() < f64::EPSILON);
        assert!((peak_over_mean(&[0, 300, 100]) - 1.5).abs() < 1e-9);
    }
}
