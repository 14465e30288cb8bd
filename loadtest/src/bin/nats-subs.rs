//! What one NATS subscription per connected user costs the NATS tier, for
//! docs/capacity.md: subscriptions are added in steps (spread over a few connections, as
//! gateway replicas hold them) and after each step every node's memory and the
//! propagation delay of a new interest across the cluster are read; then publishes to
//! random users' subjects measure the servers' CPU per message with the full interest
//! graph, and subscribe/unsubscribe churn measures how fast interest can change.
//!
//! Figures come from each node's monitoring endpoint (`/varz`: RSS, CPU, message counts),
//! so the clients' own costs do not mix in.
//!
//! ```text
//! nats-subs --urls nats://127.0.0.1:4222,... --monitor http://127.0.0.1:8222,... \
//!           --subs 200000 --step 50000 --conns 4 --publish-secs 10 --churn-secs 10
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Parser)]
#[command(about = "NATS subscription cost: memory, propagation, publish CPU and churn")]
struct Args {
    /// Client URLs of the nodes, comma-separated; subscribers use the first, the
    /// propagation probe publishes on the last.
    #[arg(long, value_delimiter = ',')]
    urls: Vec<String>,
    /// Monitoring base URLs of the nodes (`-m` port), same order.
    #[arg(long, value_delimiter = ',')]
    monitor: Vec<String>,
    /// Subscriptions in total.
    #[arg(long, default_value_t = 200_000)]
    subs: usize,
    /// Subscriptions added per step.
    #[arg(long, default_value_t = 50_000)]
    step: usize,
    /// Subscribing connections (gateway replicas).
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Seconds of publishing to random subscribed subjects at the end.
    #[arg(long, default_value_t = 10)]
    publish_secs: u64,
    /// Process ids of the nodes, same order (CPU time from `/proc`; `/varz` has no pid).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Seconds of subscribe/unsubscribe churn at the end.
    #[arg(long, default_value_t = 10)]
    churn_secs: u64,
}

fn subject(i: usize) -> String {
    format!("ws.push.user.u{i}")
}

async fn varz(http: &reqwest::Client, base: &str) -> Result<Value, BoxError> {
    let body = http
        .get(format!("{base}/varz"))
        .send()
        .await?
        .bytes()
        .await?;
    Ok(serde_json::from_slice(&body)?)
}

/// RSS (bytes) and CPU seconds of every node.
async fn node_figures(
    http: &reqwest::Client,
    monitors: &[String],
    pids: &[u32],
) -> Result<Vec<(f64, f64, f64)>, BoxError> {
    let mut out = Vec::new();
    for (i, m) in monitors.iter().enumerate() {
        let v = varz(http, m).await?;
        let mem = v["mem"].as_f64().unwrap_or(0.0);
        let subs = v["subscriptions"].as_f64().unwrap_or(0.0);
        out.push((mem, pids.get(i).map_or(0.0, |p| cpu_seconds(*p)), subs));
    }
    Ok(out)
}

/// `/varz` reports CPU as a percentage; the process's total CPU time comes from
/// `/proc/<pid>/stat` (the nodes run on this machine).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces): utime is the 14th field.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Time until a publish on the last node reaches a subscription just made on the first.
async fn propagation(
    subscriber: &async_nats::Client,
    publisher: &async_nats::Client,
    tag: &str,
) -> Result<Duration, BoxError> {
    let subj = format!("ws.push.user.probe-{tag}");
    let mut sub = subscriber.subscribe(subj.clone()).await?;
    subscriber.flush().await?;
    let start = Instant::now();
    loop {
        publisher.publish(subj.clone(), "p".into()).await?;
        publisher.flush().await?;
        if tokio::time::timeout(Duration::from_millis(2), sub.next())
            .await
            .is_ok()
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err("interest did not propagate within 30 s".into());
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let (Some(first), Some(last)) = (args.urls.first(), args.urls.last()) else {
        return Err("--urls is required".into());
    };
    if args.monitor.len() != args.urls.len() {
        return Err("--monitor needs one URL per node".into());
    }
    let http = servicekit::http_client::client(servicekit::http_client::ClientOptions::default())?;
    let mut conns = Vec::new();
    for _ in 0..args.conns.max(1) {
        conns.push(
            async_nats::ConnectOptions::new()
                .subscription_capacity(64)
                .connect(first.as_str())
                .await?,
        );
    }
    let publisher = async_nats::connect(last.as_str()).await?;
    let base = node_figures(&http, &args.monitor, &args.pids).await?;
    println!(
        "nodes: {}, subscribing connections: {}",
        args.urls.len(),
        conns.len()
    );
    println!(
        "| subscriptions | subscribe rate (/s) | {} | new-interest propagation |",
        (0..args.urls.len())
            .map(|n| format!("node {} RSS delta (MB) / bytes per sub", n + 1))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}---|", "---|".repeat(args.urls.len()));
    let mut subs: Vec<async_nats::Subscriber> = Vec::with_capacity(args.subs);
    while subs.len() < args.subs {
        let start = Instant::now();
        let goal = (subs.len() + args.step).min(args.subs);
        for i in subs.len()..goal {
            let conn = &conns[i % conns.len()];
            subs.push(conn.subscribe(subject(i)).await?);
        }
        for c in &conns {
            c.flush().await?;
        }
        let rate = args.step as f64 / start.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let prop = propagation(&conns[0], &publisher, &subs.len().to_string()).await?;
        let now = node_figures(&http, &args.monitor, &args.pids).await?;
        let cols: Vec<String> = now
            .iter()
            .zip(&base)
            .map(|(n, b)| {
                let delta = n.0 - b.0;
                format!("{:.1} / {:.0}", delta / 1e6, delta / subs.len() as f64)
            })
            .collect();
        println!(
            "| {} | {:.0} | {} | {:.1} ms |",
            subs.len(),
            rate,
            cols.join(" | "),
            prop.as_secs_f64() * 1e3
        );
    }

    // Publishes to random subscribed subjects (each has exactly one subscriber). The
    // subscribers do not read: the client library drops what overflows their small
    // buffers, which costs the servers nothing extra.
    let before = node_figures(&http, &args.monitor, &args.pids).await?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while start.elapsed() < Duration::from_secs(args.publish_secs) {
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % subs.len().max(1) as u64) as usize;
            publisher.publish(subject(i), "x".into()).await?;
            sent += 1;
        }
        publisher.flush().await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let after = node_figures(&http, &args.monitor, &args.pids).await?;
    let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    println!(
        "publish to random users with {} subscriptions: {sent} messages in {secs:.1} s ({:.0}/s), all nodes' CPU {:.2} s = {:.1} µs per message",
        subs.len(),
        sent as f64 / secs,
        cpu,
        cpu / sent as f64 * 1e6
    );

    // Churn: unsubscribe one and subscribe a new one, as users leave and arrive.
    let before = node_figures(&http, &args.monitor, &args.pids).await?;
    let start = Instant::now();
    let mut changes = 0u64;
    let mut next = subs.len();
    while start.elapsed() < Duration::from_secs(args.churn_secs) {
        for _ in 0..1000 {
            let slot = next % subs.len().max(1);
            let conn = &conns[next % conns.len()];
            let fresh = conn.subscribe(subject(next)).await?;
            let old = std::mem::replace(&mut subs[slot], fresh);
            let mut old = old;
            old.unsubscribe().await?;
            next += 1;
            changes += 1;
        }
        for c in &conns {
            c.flush().await?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let after = node_figures(&http, &args.monitor, &args.pids).await?;
    let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    println!(
        "churn: {changes} unsubscribe+subscribe pairs in {secs:.1} s ({:.0}/s), all nodes' CPU {:.2} s = {:.1} µs per pair",
        changes as f64 / secs,
        cpu,
        cpu / changes as f64 * 1e6
    );
    Ok(())
}
