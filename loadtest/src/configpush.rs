//! The fleet scenario's config-push mode: once the simulated agents are online (they ack
//! every config document as applied at once), two figures from seed 001's table ("config
//! push latency 50 ms"):
//! - **one agent among all**: `SINGLE` times, a new document for one agent
//!   (`POST /v1/configs/{name}` with `nodes: [one]`), polled every 2 ms until the scheduler
//!   shows it applied: create -> applied ack as the operator sees it, p50/p99/max;
//! - **all agents**: one document to the whole fleet (label selector), polled until every
//!   agent is applied: create -> all acked, with the scheduler's CPU and RSS.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::hist::Hist;
use crate::http;
use crate::procfs;
use crate::report::Row;

/// What the coordinator passes in.
pub(crate) struct Plan<'a> {
    /// Scheduler API address.
    pub addr: SocketAddr,
    /// API key.
    pub key: &'a str,
    /// Agents online, named `<prefix>-<index>`.
    pub agents: u64,
    /// Their user id prefix.
    pub prefix: &'a str,
    /// Single-agent pushes to time.
    pub single: u64,
    /// The scheduler's pid, for CPU and RSS.
    pub scheduler_pid: Option<u32>,
    /// When to give up.
    pub deadline: Instant,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn call(
    plan: &Plan<'_>,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), Error> {
    let r = http::request(
        plan.addr,
        method,
        path,
        plan.key,
        body,
        Duration::from_secs(30),
    )
    .await?;
    Ok((r.status, r.json()))
}

/// Sets document `name` for `targets`; returns after the scheduler answered.
async fn set(plan: &Plan<'_>, name: &str, targets: Value) -> Result<(), Error> {
    let body = json!({"content": format!("# {name}\nkey = \"value\"\n"), "targets": targets});
    let (status, v) = call(
        plan,
        reqwest::Method::POST,
        &format!("/v1/configs/{name}"),
        Some(&body),
    )
    .await?;
    if status != 201 && status != 200 {
        return Err(format!("set config {name}: HTTP {status}: {v}").into());
    }
    Ok(())
}

/// Applied nodes of `name`.
async fn applied(plan: &Plan<'_>, name: &str) -> Result<u64, Error> {
    let (_, v) = call(
        plan,
        reqwest::Method::GET,
        &format!("/v1/configs/{name}/status"),
        None,
    )
    .await?;
    Ok(v["counts"]["applied"].as_u64().unwrap_or(0))
}

/// Runs both measurements; returns the summary fields and rows.
pub(crate) async fn drive(plan: Plan<'_>) -> Result<(Value, Vec<Row>), Error> {
    let mut lat = Hist::default();
    let mut timeouts = 0u64;
    for i in 0..plan.single {
        // A spread of agents: a stride coprime with most fleet sizes.
        let node = format!("{}-{}", plan.prefix, (i * 7_919) % plan.agents.max(1));
        let name = format!("bench-one-{i}.conf");
        let t0 = Instant::now();
        set(&plan, &name, json!({"nodes": [node]})).await?;
        let until = t0 + Duration::from_secs(5);
        loop {
            if applied(&plan, &name).await? >= 1 {
                lat.record(t0.elapsed().as_micros() as u64);
                break;
            }
            if Instant::now() > until || Instant::now() > plan.deadline {
                timeouts += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let cpu0 = plan.scheduler_pid.and_then(procfs::cpu_secs);
    let t0 = Instant::now();
    set(
        &plan,
        "bench-all.conf",
        json!({"labels": {"fleet": "loadtest"}}),
    )
    .await?;
    let create_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut done = 0;
    let mut rss_max = 0u64;
    let mut all_secs = None;
    while Instant::now() < plan.deadline {
        done = applied(&plan, "bench-all.conf").await?;
        if let Some(r) = plan.scheduler_pid.and_then(procfs::rss_kib) {
            rss_max = rss_max.max(r);
        }
        if done >= plan.agents {
            all_secs = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = match (cpu0, plan.scheduler_pid.and_then(procfs::cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let ms = |p: f64| lat.ms(p);
    let rows = vec![
        Row::new(
            format!(
                "config to one agent of {}: create -> applied (n = {})",
                plan.agents, plan.single
            ),
            format!(
                "p50 {:.1} / p99 {:.1} / max {:.1} ms, {timeouts} not applied in 5 s",
                ms(50.0),
                ms(99.0),
                ms(100.0)
            ),
        ),
        Row::new(
            format!("config to all {}: POST, create -> all applied", plan.agents),
            format!(
                "{create_ms:.0} ms, {}",
                all_secs.map_or(format!("NOT DONE ({done} applied)"), |s| format!(
                    "{s:.2} s"
                ))
            ),
        ),
        Row::new(
            "scheduler CPU for the push to all, RSS max",
            format!(
                "{}, {:.1} MiB",
                cpu.map_or("n/a".to_owned(), |c| format!("{c:.2} s")),
                rss_max as f64 / 1024.0
            ),
        ),
    ];
    let summary = json!({
        "config_single_n": plan.single,
        "config_single_p50_ms": ms(50.0),
        "config_single_p99_ms": ms(99.0),
        "config_single_max_ms": ms(100.0),
        "config_single_timeouts": timeouts,
        "config_all_create_ms": create_ms,
        "config_all_secs": all_secs,
        "config_all_applied": done,
        "scheduler_cpu_secs_config_all": cpu,
        "scheduler_rss_kib_config_all_max": rss_max,
    });
    Ok((summary, rows))
}
