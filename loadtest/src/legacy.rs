//! The single-process scenarios kept from the first load generator (`connect`, `idle`,
//! `fanout`, `api-push`), used by `scenarios/gateway-bench.sh` and `scenarios/api-bench.sh`:
//! one process opens every connection, runs the scenario and prints its figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use messages::envelope::PushEnvelope;
use messages::payload::{HeartbeatAck, Welcome};
use messages::{BodyCodec, Frame, FrameKind, headers, payload};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{BoxError, Ws, connect, limits, sign, source_for};
use crate::procfs::{cpu_secs, gateway_pid, rss_kib};
use crate::{Cli, Legacy};

/// Counters shared by every client task.
#[derive(Debug, Default)]
struct Stats {
    connected: AtomicUsize,
    failed: AtomicUsize,
    received: AtomicU64,
    closed_by_server: AtomicUsize,
}

pub(crate) async fn run(cli: &Cli, scenario: &Legacy) -> Result<(), BoxError> {
    let urls: Vec<String> = cli
        .urls
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("no --urls".into());
    }
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let cpu_before = gateway_pid().and_then(cpu_secs);
    let clients = open_all(cli, &urls, &stats, &stop).await;
    let open_secs = started.elapsed().as_secs_f64();
    let open_cpu = match (cpu_before, gateway_pid().and_then(cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    if let Some(cpu) = open_cpu {
        println!(
            "gateway CPU while opening: {cpu:.2} s ({:.0} µs per accepted connection)",
            cpu * 1e6 / clients.len().max(1) as f64
        );
    }
    let connected = stats.connected.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    let mut handshakes: Vec<u64> = clients.iter().map(|c| c.handshake_us).collect();
    handshakes.sort_unstable();
    println!(
        "opened {connected} connections ({failed} failed) in {open_secs:.2}s: {:.0} accepts/s; handshake p50 {:.2} ms, p99 {:.2} ms",
        connected as f64 / open_secs,
        percentile(&handshakes, 50.0) as f64 / 1000.0,
        percentile(&handshakes, 99.0) as f64 / 1000.0,
    );
    let report = match scenario {
        Legacy::Connect => serde_json::json!({
            "scenario": "connect", "connections": connected, "failed": failed,
            "seconds": open_secs, "accepts_per_sec": connected as f64 / open_secs,
            "handshake_p50_ms": percentile(&handshakes, 50.0) as f64 / 1000.0,
            "handshake_p99_ms": percentile(&handshakes, 99.0) as f64 / 1000.0,
            "gateway_cpu_secs": open_cpu,
        }),
        Legacy::Idle { hold_secs, pid } => {
            let before = cli_rss_before(*pid);
            let rss_after_open = pid.and_then(rss_kib);
            tokio::time::sleep(Duration::from_secs(*hold_secs)).await;
            let rss_end = pid.and_then(rss_kib);
            let per_conn = match (before, rss_end) {
                (Some(b), Some(a)) if connected > 0 => {
                    Some((a.saturating_sub(b)) as f64 * 1024.0 / connected as f64)
                }
                _ => None,
            };
            if let Some(bytes) = per_conn {
                println!(
                    "gateway RSS per idle connection: {:.0} bytes ({:.1} KB)",
                    bytes,
                    bytes / 1000.0
                );
            }
            serde_json::json!({
                "scenario": "idle", "connections": connected, "hold_secs": hold_secs,
                "gateway_rss_kib_baseline": before, "gateway_rss_kib_after_open": rss_after_open,
                "gateway_rss_kib_end": rss_end, "gateway_bytes_per_connection": per_conn,
                "closed_by_server": stats.closed_by_server.load(Ordering::Relaxed),
            })
        }
        Legacy::Fanout {
            nats_url,
            messages,
            size,
            rate,
        } => fanout(nats_url, *messages, *size, *rate, connected, &stats).await?,
        Legacy::ApiPush {
            api,
            api_key,
            pushes,
            http_concurrency,
            size,
        } => {
            api_push(
                api,
                api_key,
                &cli.user_prefix,
                connected,
                *pushes,
                *http_concurrency,
                *size,
                &stats,
            )
            .await?
        }
    };
    let _ = stop_tx.send(true);
    let mut latencies = Vec::new();
    for c in clients {
        if let Ok(mut l) = c.task.await {
            latencies.append(&mut l);
        }
    }
    let mut report = report;
    if !latencies.is_empty() {
        latencies.sort_unstable();
        let p50 = percentile(&latencies, 50.0) as f64 / 1000.0;
        let p99 = percentile(&latencies, 99.0) as f64 / 1000.0;
        let max = latencies.last().copied().unwrap_or(0) as f64 / 1000.0;
        println!(
            "push latency (sender's timestamp in the body -> client): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms over {} deliveries",
            latencies.len()
        );
        report["latency_p50_ms"] = p50.into();
        report["latency_p99_ms"] = p99.into();
        report["latency_max_ms"] = max.into();
    }
    println!("{report}");
    Ok(())
}

/// The baseline RSS must be read before connections open; `open_all` runs first, so the
/// idle scenario reads it from the environment variable the runner script sets.
fn cli_rss_before(pid: Option<u32>) -> Option<u64> {
    std::env::var("LOADTEST_BASELINE_RSS_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| pid.and_then(rss_kib))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Client {
    handshake_us: u64,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

async fn open_all(
    cli: &Cli,
    urls: &[String],
    stats: &Arc<Stats>,
    stop: &watch::Receiver<bool>,
) -> Vec<Client> {
    let permits = Arc::new(Semaphore::new(cli.concurrency.max(1)));
    let mut pending = Vec::with_capacity(cli.connections);
    for i in 0..cli.connections {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        let url = urls[i % urls.len()].clone();
        let token = sign(&cli.secret, &format!("{}-{i}", cli.user_prefix), "app");
        let source = source_for(i, 2, cli.sources);
        let stats = Arc::clone(stats);
        let stop = stop.clone();
        pending.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = connect(&url, &token, source).await;
            drop(permit);
            match result {
                Ok((ws, welcome)) => {
                    let handshake_us = started.elapsed().as_micros() as u64;
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    let task = tokio::spawn(hold(ws, welcome, stats, stop));
                    Some(Client { handshake_us, task })
                }
                Err(e) => {
                    if stats.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect failed: {e}");
                    }
                    None
                }
            }
        }));
    }
    let mut clients = Vec::with_capacity(pending.len());
    for p in pending {
        if let Ok(Some(c)) = p.await {
            clients.push(c);
        }
    }
    clients
}

/// Holds a connection: heartbeats as told, records push latencies, stops on `stop`.
async fn hold(
    mut ws: Ws,
    welcome: Welcome,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Vec<u64> {
    let mut latencies = Vec::new();
    let mut interval = Duration::from_millis(u64::from(welcome.heartbeat.base_ms.max(100)));
    let mut next_beat = tokio::time::Instant::now() + interval;
    let mut beat_id = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(next_beat) => {
                beat_id += 1;
                let beat = Frame::new(FrameKind::Heartbeat).with_msg_id(beat_id).encode();
                if ws.send(Message::Binary(beat)).await.is_err() {
                    break;
                }
                next_beat = tokio::time::Instant::now() + interval;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let Ok(frame) = Frame::decode(&bytes, &limits()) else { continue };
                    match frame.kind {
                        FrameKind::Push => {
                            stats.received.fetch_add(1, Ordering::Relaxed);
                            if let Some(sent) = frame.body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                                latencies.push(headers::now_micros().saturating_sub(u64::from_be_bytes(sent)));
                            }
                        }
                        FrameKind::HeartbeatAck => {
                            if let Ok(ack) = payload::decode_body::<HeartbeatAck>(frame.flags.codec(), &frame.body) {
                                interval = Duration::from_millis(u64::from(ack.next_interval_ms.max(100)));
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    let _ = ws.close(None).await;
    latencies
}

async fn fanout(
    nats_url: &str,
    messages: usize,
    size: usize,
    rate: u32,
    connected: usize,
    stats: &Stats,
) -> Result<serde_json::Value, BoxError> {
    let client = async_nats::connect(nats_url).await?;
    let size = size.max(8);
    let gap = if rate == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(1.0 / f64::from(rate))
    };
    let expected = (messages * connected) as u64;
    let before = stats.received.load(Ordering::Relaxed);
    let cpu_before = gateway_pid().and_then(cpu_secs);
    let started = Instant::now();
    for i in 0..messages {
        let mut body = vec![0u8; size];
        body[..8].copy_from_slice(&headers::now_micros().to_be_bytes());
        let mut map =
            PushEnvelope::new(i as u64 + 1, messages::Route::empty(), BodyCodec::Raw).to_headers();
        headers::stamp_hop(&mut map, headers::hop::SERVICE_PUB, headers::now_micros());
        client
            .publish_with_headers(messages::subject::broadcast(), map, Bytes::from(body))
            .await?;
        if !gap.is_zero() {
            // Pace by deadline, not by sleeping `gap` each time: the timer's 1 ms granularity
            // would cap the rate near 1,000/s; after an oversleep the next ones go at once.
            let due = started + gap.mul_f64((i + 1) as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
            }
        }
    }
    client.flush().await?;
    let publish_secs = started.elapsed().as_secs_f64();
    wait_settled(stats, before, expected).await;
    let delivered = stats.received.load(Ordering::Relaxed) - before;
    let secs = started.elapsed().as_secs_f64() - if delivered >= expected { 0.0 } else { 2.0 };
    let cpu = match (cpu_before, gateway_pid().and_then(cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    if let Some(cpu) = cpu {
        println!(
            "gateway CPU for the fan-out: {cpu:.2} s ({:.2} CPU-s per million deliveries)",
            cpu * 1e6 / delivered.max(1) as f64
        );
    }
    println!(
        "fanout: {messages} pushes x {connected} sockets = {expected} expected, {delivered} delivered in {secs:.2}s: {:.0} deliveries/s (published in {publish_secs:.2}s)",
        delivered as f64 / secs
    );
    Ok(serde_json::json!({
        "scenario": "fanout", "connections": connected, "messages": messages, "size": size,
        "expected": expected, "delivered": delivered, "seconds": secs,
        "deliveries_per_sec": delivered as f64 / secs, "publish_seconds": publish_secs,
        "gateway_cpu_secs": cpu,
    }))
}

/// Sends `pushes` HTTP pushes, each to one random connected user, over `concurrency`
/// keep-alive connections; the body carries the send time so clients measure latency.
#[allow(clippy::too_many_arguments)]
async fn api_push(
    api: &str,
    key: &str,
    prefix: &str,
    users: usize,
    pushes: usize,
    concurrency: usize,
    size: usize,
    stats: &Stats,
) -> Result<serde_json::Value, BoxError> {
    use base64::Engine as _;
    if users == 0 {
        return Err("no connected clients".into());
    }
    let addr: SocketAddr = api.parse()?;
    let before = stats.received.load(Ordering::Relaxed);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency.max(1) {
        let (next, errors) = (Arc::clone(&next), Arc::clone(&errors));
        let (key, prefix) = (key.to_owned(), prefix.to_owned());
        workers.push(tokio::spawn(async move {
            // One client per worker: its pooled keep-alive connection carries the worker's
            // requests one after another, as a real API client would.
            let Ok(client) = servicekit::http_client::client(Default::default()) else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let url = format!("http://{addr}/v1/push");
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
            loop {
                if next.fetch_add(1, Ordering::Relaxed) >= pushes {
                    break;
                }
                // xorshift: cheap, good enough to spread targets.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let user = format!("{prefix}-{}", seed % users as u64);
                let mut body = vec![0u8; size.max(8)];
                body[..8].copy_from_slice(&headers::now_micros().to_be_bytes());
                let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
                let json = format!(
                    r#"{{"target":{{"users":["{user}"]}},"body_base64":"{b64}","codec":"raw"}}"#
                );
                let sent = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(json)
                    .send()
                    .await;
                let accepted = match sent {
                    // The body is read so the connection can carry the next request.
                    Ok(r) => r.status() == reqwest::StatusCode::ACCEPTED && r.bytes().await.is_ok(),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                };
                if !accepted {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let http_secs = started.elapsed().as_secs_f64();
    let failed = errors.load(Ordering::Relaxed);
    let expected = (pushes - failed) as u64;
    wait_settled(stats, before, expected).await;
    let delivered = stats.received.load(Ordering::Relaxed) - before;
    println!(
        "api-push: {pushes} pushes over {concurrency} connections in {http_secs:.2}s: {:.0} accepted pushes/s ({failed} failed), {delivered} delivered",
        (pushes - failed) as f64 / http_secs
    );
    Ok(serde_json::json!({
        "scenario": "api-push", "connections": users, "pushes": pushes, "failed": failed,
        "http_concurrency": concurrency, "size": size, "http_seconds": http_secs,
        "pushes_per_sec": (pushes - failed) as f64 / http_secs, "delivered": delivered,
    }))
}

/// Waits until `expected` pushes arrived since `before`, or until the count has not moved
/// for 2 s (the rest is lost), so a run always ends.
async fn wait_settled(stats: &Stats, before: u64, expected: u64) {
    let mut last = 0;
    let mut still = 0;
    while still < 20 {
        let got = stats.received.load(Ordering::Relaxed) - before;
        if got >= expected {
            break;
        }
        if got == last {
            still += 1;
        } else {
            still = 0;
        }
        last = got;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
