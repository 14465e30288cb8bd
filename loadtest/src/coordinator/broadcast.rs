//! Scenarios 2-4, the periodic broadcast (`--scenario broadcast`): once every connection
//! is open, `--pushes` stamped pushes go to all, every `--interval-secs`, through ws-api
//! (`POST /v1/push`), straight on the bus, or (the peer) on nats-server's own WebSocket
//! listener; with or without receipts, with or without churn. It measures deliveries
//! expected / received / lost, end-to-end latency, acks and ws-api's receipt counts. It
//! owns the publishing and the broadcast summary, built only once the workers' last lines
//! (their final per-push counts) are in.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use super::{Agg, Done, Driven, Run, RunArgs, Via, proc_rows};
use crate::client::{self, BoxError};
use crate::http;
use crate::report::Row;

/// What the driver hands over to [`summary`] once the workers have stopped.
pub(super) struct BroadcastDone {
    pushed: Vec<Pushed>,
    receipts: Vec<Value>,
    secs: f64,
    procs: Value,
    proc_rows: Vec<Row>,
}

/// A published push: when, how many were open, the API's answer.
#[derive(Debug, Clone, Serialize)]
struct Pushed {
    seq: u64,
    at_s: f64,
    open: u64,
    http_ms: f64,
    push_id: Option<String>,
    targeted: Option<u64>,
    error: Option<String>,
}

/// Route of the broadcast pushes (a valid route: `Route::new` cannot refuse it).
const BROADCAST_ROUTE: &str = "bench.broadcast";

/// Where the pushes go.
enum Publisher {
    Api(SocketAddr),
    /// nats-server's WebSocket peer: plain publishes its clients subscribed to.
    Peer(async_nats::Client),
    /// The gateways' broadcast subject, with a push envelope.
    Bus(async_nats::Client, messages::Route),
}

impl Publisher {
    async fn new(args: &RunArgs) -> Result<Publisher, BoxError> {
        let via = if args.peer_nats_ws {
            Via::Nats
        } else {
            args.via
        };
        Ok(match via {
            Via::Api => Publisher::Api(args.api.parse()?),
            Via::Nats if args.peer_nats_ws => {
                Publisher::Peer(async_nats::connect(&args.nats_url).await?)
            }
            Via::Nats => Publisher::Bus(
                async_nats::connect(&args.nats_url).await?,
                messages::Route::new(BROADCAST_ROUTE).unwrap_or_default(),
            ),
        })
    }

    fn api(&self) -> Option<SocketAddr> {
        match self {
            Publisher::Api(addr) => Some(*addr),
            _ => None,
        }
    }

    /// Publishes push `p.seq`, filling in the answer (push id, audience) or the error.
    async fn publish(&self, args: &RunArgs, p: &mut Pushed, body: Vec<u8>) {
        match self {
            Publisher::Api(addr) => api_push(*addr, args, p, &body).await,
            Publisher::Peer(nc) => {
                if let Err(e) = nc.publish(crate::natsws::SUBJECT, Bytes::from(body)).await {
                    p.error = Some(e.to_string());
                } else {
                    let _ = nc.flush().await;
                }
            }
            Publisher::Bus(nc, route) => {
                let push = messages::envelope::PushEnvelope {
                    receipt: args.receipts,
                    ..messages::envelope::PushEnvelope::new(
                        p.seq,
                        route.clone(),
                        messages::BodyCodec::Raw,
                    )
                };
                if let Err(e) = nc
                    .publish_with_headers(
                        messages::subject::broadcast(),
                        push.to_headers(),
                        Bytes::from(body),
                    )
                    .await
                {
                    p.error = Some(e.to_string());
                } else {
                    let _ = nc.flush().await;
                }
            }
        }
    }
}

/// `POST /v1/push` to all.
async fn api_push(addr: SocketAddr, args: &RunArgs, p: &mut Pushed, body: &[u8]) {
    let req = json!({
        "target": {"all": true},
        "body_base64": base64::engine::general_purpose::STANDARD.encode(body),
        "codec": "raw",
        "route": BROADCAST_ROUTE,
        "receipt": args.receipts,
    });
    match http::request(
        addr,
        reqwest::Method::POST,
        "/v1/push",
        &args.api_key,
        Some(&req),
        Duration::from_secs(10),
    )
    .await
    {
        Ok(r) if r.status == 202 => {
            let j = r.json();
            p.push_id = j["push_id"].as_str().map(str::to_owned);
            p.targeted = j["targeted"].as_u64();
        }
        Ok(r) => {
            p.error = Some(format!(
                "HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        Err(e) => p.error = Some(e.to_string()),
    }
}

/// Publishes every push on schedule once all connections are open, then collects
/// ws-api's receipt counts and the servers' figures while the connections are held.
pub(super) async fn broadcast(run: &Run) -> Driven {
    let args = &run.args;
    if !run.wait_opened(run.remaining()).await {
        return Err("not every connection opened within --max-secs".into());
    }
    // Let presence catch up (ws-api counts its audience from it) before the first push.
    tokio::time::sleep(Duration::from_secs(2).min(run.remaining())).await;
    let publisher = Publisher::new(args).await?;
    let interval = Duration::from_secs_f64(args.interval_secs.max(0.1));
    let broadcast_start = Instant::now();
    let pushed = publish_all(run, &publisher, interval).await;
    // Grace for the last deliveries and acks.
    tokio::time::sleep(interval.min(run.remaining())).await;
    let broadcast_secs = broadcast_start.elapsed().as_secs_f64();
    let receipts = match (publisher.api(), args.receipts) {
        (Some(addr), true) => receipts(run, addr, &pushed).await,
        _ => Vec::new(),
    };
    // Server memory and CPU while the connections are still held.
    let mut procs = json!({});
    let mut proc_rows_ = Vec::new();
    let open = run.agg().open_now();
    proc_rows(run, &mut procs, &mut proc_rows_, open);
    Ok(Done::Broadcast(Box::new(BroadcastDone {
        pushed,
        receipts,
        secs: broadcast_secs,
        procs,
        proc_rows: proc_rows_,
    })))
}

/// The pushes, one every `interval` from now, until `--pushes` or `--max-secs`.
async fn publish_all(run: &Run, publisher: &Publisher, interval: Duration) -> Vec<Pushed> {
    let args = &run.args;
    let mut pushed = Vec::new();
    let t0 = tokio::time::Instant::now();
    for seq in 1..=args.pushes {
        if run.remaining() < interval {
            eprintln!("\nbroadcast: stopping early, --max-secs reached");
            break;
        }
        tokio::time::sleep_until(t0 + interval.mul_f64((seq - 1) as f64)).await;
        let body = client::stamped_body(seq, args.size);
        let mut p = Pushed {
            seq,
            at_s: run.started.elapsed().as_secs_f64(),
            open: run.agg().open_now(),
            http_ms: 0.0,
            push_id: None,
            targeted: None,
            error: None,
        };
        let sent = Instant::now();
        publisher.publish(args, &mut p, body).await;
        p.http_ms = sent.elapsed().as_secs_f64() * 1000.0;
        if let Some(e) = &p.error {
            eprintln!("\npush {seq} failed: {e}");
        }
        {
            let mut agg = run.agg();
            let t = run.t();
            agg.second(t).pushes += 1;
        }
        pushed.push(p);
    }
    pushed
}

/// ws-api's own receipt counts of every push it accepted, read after
/// `--receipt-wait-secs` (they are updated asynchronously).
async fn receipts(run: &Run, addr: SocketAddr, pushed: &[Pushed]) -> Vec<Value> {
    let args = &run.args;
    tokio::time::sleep(Duration::from_secs(args.receipt_wait_secs).min(run.remaining())).await;
    let mut receipts = Vec::new();
    for p in pushed {
        let Some(id) = &p.push_id else { continue };
        if let Ok(r) = http::request(
            addr,
            reqwest::Method::GET,
            &format!("/v1/pushes/{id}"),
            &args.api_key,
            None,
            Duration::from_secs(5),
        )
        .await
        {
            receipts.push(r.json());
        }
    }
    receipts
}

/// The deliveries as the workers' last lines and ws-api's receipts count them.
struct Tally {
    sent: u64,
    late_but_delivered: u64,
    expected: u64,
    lost: u64,
    delivered: u64,
    acks: u64,
    peak_recv: u64,
    peak_acks: u64,
    api_targeted: u64,
    api_delivered: u64,
    api_acked: u64,
    http_max: f64,
    secs: f64,
}

impl Tally {
    fn new(agg: &Agg, done: &BroadcastDone) -> Tally {
        let pushed = &done.pushed;
        let receipts = &done.receipts;
        // A push whose publish call failed (a timeout) may still have gone out: it counts
        // as expected once any client got it.
        let got = |seq: u64| agg.per_push.get(&seq).copied().unwrap_or(0);
        let counted: Vec<&Pushed> = pushed
            .iter()
            .filter(|p| p.error.is_none() || got(p.seq) > 0)
            .collect();
        let receipt_sum =
            |key: &str| -> u64 { receipts.iter().filter_map(|r| r[key].as_u64()).sum() };
        Tally {
            sent: pushed.iter().filter(|p| p.error.is_none()).count() as u64,
            late_but_delivered: counted.iter().filter(|p| p.error.is_some()).count() as u64,
            expected: counted.iter().map(|p| p.open).sum(),
            lost: counted
                .iter()
                .map(|p| p.open.saturating_sub(got(p.seq)))
                .sum(),
            delivered: agg.totals.recv,
            acks: agg.totals.acks,
            peak_recv: agg.seconds.iter().map(|s| s.recv).max().unwrap_or(0),
            peak_acks: agg.seconds.iter().map(|s| s.acks).max().unwrap_or(0),
            api_targeted: receipt_sum("targeted"),
            api_delivered: receipt_sum("delivered"),
            api_acked: receipt_sum("acked"),
            http_max: pushed.iter().map(|p| p.http_ms).fold(0.0, f64::max),
            secs: done.secs.max(1e-3),
        }
    }
}

/// Builds the broadcast summary once the workers' last lines are in.
pub(super) fn summary(run: &Run, done: BroadcastDone) -> (Value, Vec<Row>) {
    let agg = run.agg();
    let tally = Tally::new(&agg, &done);
    let mut summary = summary_json(&run.args, &agg, &tally, &done);
    let mut rows = summary_rows(&run.args, &agg, &tally, &done);
    if let (Some(obj), Some(p)) = (summary.as_object_mut(), done.procs.as_object()) {
        for (k, v) in p {
            obj.insert(k.clone(), v.clone());
        }
    }
    let BroadcastDone {
        proc_rows: mut extra_rows,
        ..
    } = done;
    rows.append(&mut extra_rows);
    (summary, rows)
}

fn summary_json(args: &RunArgs, agg: &Agg, t: &Tally, done: &BroadcastDone) -> Value {
    let pushed = &done.pushed;
    let lat = &agg.lat;
    let mut summary = json!({
        "pushes_sent": t.sent,
        "push_errors": pushed.len() as u64 - t.sent,
        "push_errors_delivered_anyway": t.late_but_delivered,
        "interval_secs": args.interval_secs,
        "size": args.size,
        "receipts": args.receipts,
        "churn_per_sec": args.churn,
        "via": if args.peer_nats_ws { json!("peer-nats-ws") } else { serde_json::to_value(args.via).unwrap_or_default() },
        "connections_open_at_last_push": pushed.last().map_or(0, |p| p.open),
        "expected_deliveries": t.expected,
        "delivered": t.delivered,
        "lost": t.lost,
        "lost_in_session_gaps": agg.gaps,
        "missed_while_connected": agg.missed,
        "delivered_per_sec_mean": t.delivered as f64 / t.secs,
        "delivered_per_sec_peak": t.peak_recv,
        "acks_sent": t.acks,
        "acks_per_sec_mean": t.acks as f64 / t.secs,
        "acks_per_sec_peak": t.peak_acks,
        "e2e_p50_ms": lat.ms(50.0),
        "e2e_p99_ms": lat.ms(99.0),
        "e2e_max_ms": lat.ms(100.0),
        "publish_call_max_ms": t.http_max,
        "reconnects": agg.totals.churned,
        "connect_errors": agg.totals.connect_errors,
        "closed_by_server": agg.totals.closed,
        "pushes": pushed,
    });
    if !done.receipts.is_empty() {
        summary["api_targeted"] = t.api_targeted.into();
        summary["api_delivered"] = t.api_delivered.into();
        summary["api_acked"] = t.api_acked.into();
        summary["api_receipts"] = done.receipts.clone().into();
    }
    summary
}

fn summary_rows(args: &RunArgs, agg: &Agg, t: &Tally, done: &BroadcastDone) -> Vec<Row> {
    let pushed = &done.pushed;
    let lat = &agg.lat;
    let via = if args.peer_nats_ws {
        "the nats-server WebSocket peer".to_owned()
    } else {
        format!("{:?}", args.via)
    };
    let mut rows = vec![
        Row::new(
            "pushes (size, every)",
            format!(
                "{} sent, {} failed of which {} arrived anyway ({} B every {} s, via {via}, receipts {})",
                t.sent,
                pushed.len() as u64 - t.sent,
                t.late_but_delivered,
                args.size,
                args.interval_secs,
                args.receipts
            ),
        ),
        Row::new(
            "connections open at the last push",
            pushed.last().map_or(0, |p| p.open).to_string(),
        ),
        Row::new(
            "deliveries: expected / received / lost",
            format!("{} / {} / {}", t.expected, t.delivered, t.lost),
        ),
        Row::new(
            "delivered/s (mean over the run, peak second)",
            format!("{:.0}, {}", t.delivered as f64 / t.secs, t.peak_recv),
        ),
        Row::new(
            "acks sent by clients, acks/s (mean, peak second)",
            format!("{}, {:.0}, {}", t.acks, t.acks as f64 / t.secs, t.peak_acks),
        ),
        Row::new(
            "end-to-end latency p50 / p99 / max",
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                lat.ms(50.0),
                lat.ms(99.0),
                lat.ms(100.0)
            ),
        ),
        Row::new("slowest publish call", format!("{:.1} ms", t.http_max)),
    ];
    if args.churn > 0.0 {
        rows.push(Row::new(
            "churn: reconnects, connect errors, server closes",
            format!(
                "{}, {}, {}",
                agg.totals.churned, agg.totals.connect_errors, agg.totals.closed
            ),
        ));
    }
    if !done.receipts.is_empty() {
        rows.push(Row::new(
            "ws-api receipts: targeted / delivered / acked",
            format!("{} / {} / {}", t.api_targeted, t.api_delivered, t.api_acked),
        ));
    }
    rows.push(Row::new(
        "pushes missed inside a session: gaps / stamped while open, not received",
        format!("{} / {}", agg.gaps, agg.missed),
    ));
    rows
}
