//! The fleet scenario's staged-rollout mode: once the simulated agents are online, one
//! rollout of a command over all of them (`POST /v1/rollouts`, auto-promoted), polled until
//! it completes, halts or the run's time is up; reports time per stage, where it halted and
//! with how many failures against its threshold, and the scheduler's CPU and RSS.
//!
//! Simulated agents can be told to fail ([`fail_from_task`]): a share of them answers
//! every task from a given task id on with exit code 1. Task ids are allocated in order by
//! a fresh scheduler, so "fail after the pilot" is "fail from the first task id after the
//! pilot's batches", computed here with the scheduler's stage rules.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::http;
use crate::procfs;
use crate::report::Row;

/// What the coordinator passes in.
pub(crate) struct Plan<'a> {
    /// Scheduler API address.
    pub addr: SocketAddr,
    /// API key.
    pub key: &'a str,
    /// Stages, `name=size` comma-separated (as `schedctl rollout start --stages`).
    pub stages: &'a str,
    /// Batch size, a count or a percentage of the stage.
    pub batch: &'a str,
    /// Failure threshold per stage, percent.
    pub max_failure_percent: u8,
    /// The command each batch runs.
    pub argv: Vec<String>,
    /// The scheduler's pid, for CPU and RSS.
    pub scheduler_pid: Option<u32>,
    /// When to give up.
    pub deadline: Instant,
}

/// A size as the scheduler reads it: nodes out of `of`.
fn size_of(size: &str, of: u64) -> Option<u64> {
    let size = size.trim();
    if let Some(p) = size.strip_suffix('%') {
        let p: u64 = p.trim().parse().ok().filter(|p| (1..=100).contains(p))?;
        Some(of.saturating_mul(p).div_ceil(100).max(1).min(of))
    } else {
        size.parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| n.min(of))
    }
}

/// The first task id of the stage after `after` in a rollout over `agents` nodes that is
/// the first thing a fresh scheduler creates (task ids from 1). `None` when `after` is not
/// a stage or a size does not parse.
pub(crate) fn fail_from_task(stages: &str, batch: &str, agents: u64, after: &str) -> Option<u64> {
    let mut start = 0;
    let mut tasks = 0u64;
    for stage in stages.split(',') {
        let (name, size) = stage.split_once('=')?;
        let end = size_of(size, agents)?.max(start);
        let len = end - start;
        if len > 0 {
            let per = size_of(batch, len)?.max(1);
            tasks += len.div_ceil(per);
        }
        start = end;
        if name.trim() == after {
            return Some(tasks + 1);
        }
    }
    None
}

/// Starts the rollout and polls it; returns the summary fields and rows.
pub(crate) async fn drive(
    plan: Plan<'_>,
) -> Result<(Value, Vec<Row>), Box<dyn std::error::Error + Send + Sync>> {
    let stages: Vec<Value> = plan
        .stages
        .split(',')
        .filter_map(|s| s.split_once('='))
        .map(|(n, s)| json!({"name": n.trim(), "size": s.trim()}))
        .collect();
    let req = json!({
        "targets": {"labels": {"fleet": "loadtest"}},
        "spec": {"kind": "command", "argv": plan.argv},
        "stages": stages,
        "batch": plan.batch,
        "max_failure_percent": plan.max_failure_percent,
        "auto_promote": true,
        "pause_ms": 0,
    });
    let cpu0 = plan.scheduler_pid.and_then(procfs::cpu_secs);
    let created = Instant::now();
    let resp = http::request(
        plan.addr,
        reqwest::Method::POST,
        "/v1/rollouts",
        plan.key,
        Some(&req),
        Duration::from_secs(60),
    )
    .await?;
    let create_ms = created.elapsed().as_secs_f64() * 1000.0;
    if resp.status != 201 {
        return Err(format!(
            "create rollout: HTTP {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )
        .into());
    }
    let id = resp.json()["rollout_id"]
        .as_u64()
        .ok_or("create rollout: no rollout_id")?;
    let path = format!("/v1/rollouts/{id}");
    let mut last = Value::Null;
    let mut rss_max = 0u64;
    let mut poll_errors = 0u64;
    while Instant::now() < plan.deadline {
        match http::request(
            plan.addr,
            reqwest::Method::GET,
            &path,
            plan.key,
            None,
            Duration::from_secs(30),
        )
        .await
        {
            Ok(r) => last = r.json(),
            Err(_) => poll_errors += 1,
        }
        if let Some(r) = plan.scheduler_pid.and_then(procfs::rss_kib) {
            rss_max = rss_max.max(r);
        }
        let state = last["state"].as_str().unwrap_or("");
        // Halted with the batch in flight finished, or done for good.
        if matches!(state, "completed" | "aborted")
            || (state == "halted" && last["batch"].is_null())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = created.elapsed().as_secs_f64();
    let cpu = match (cpu0, plan.scheduler_pid.and_then(procfs::cpu_secs)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let state = last["state"].as_str().unwrap_or("unknown").to_owned();
    let mut rows = vec![
        Row::new(
            "POST /v1/rollouts",
            format!("{create_ms:.0} ms, {} targets", last["total"]),
        ),
        Row::new(
            "rollout end state",
            format!(
                "{state} after {secs:.1} s{}",
                last["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        ),
    ];
    let mut stage_summary = Vec::new();
    let mut halted_within_bound = None;
    for s in last["stages"].as_array().into_iter().flatten() {
        let took = match (s["started_at_ms"].as_u64(), s["finished_at_ms"].as_u64()) {
            (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / 1000.0),
            _ => None,
        };
        let failed = s["failed"].as_u64().unwrap_or(0);
        let allowed = s["allowed_failures"].as_u64().unwrap_or(0);
        let batch = s["batch"].as_u64().unwrap_or(0);
        if s["current"] == json!(true) && state == "halted" {
            halted_within_bound = Some(failed <= allowed + batch);
        }
        rows.push(Row::new(
            format!("stage {}", s["name"].as_str().unwrap_or("?")),
            format!(
                "{} nodes in batches of {batch}: {} ok, {failed} failed (tolerates {allowed}), {}",
                s["nodes"],
                s["succeeded"],
                took.map_or("not run".to_owned(), |t| format!("{t:.2} s"))
            ),
        ));
        stage_summary.push(json!({
            "name": s["name"], "nodes": s["nodes"], "batch": batch,
            "succeeded": s["succeeded"], "failed": failed, "allowed_failures": allowed,
            "secs": took,
        }));
    }
    if let Some(ok) = halted_within_bound {
        rows.push(Row::new(
            "halt: failures <= threshold + one batch",
            if ok { "yes" } else { "NO" },
        ));
    }
    rows.push(Row::new(
        "scheduler CPU for the rollout, RSS max",
        format!(
            "{}, {:.1} MiB",
            cpu.map_or("n/a".to_owned(), |c| format!("{c:.2} s")),
            rss_max as f64 / 1024.0
        ),
    ));
    let summary = json!({
        "rollout_id": id,
        "rollout_create_ms": create_ms,
        "rollout_state": state,
        "rollout_reason": last["reason"],
        "rollout_secs": secs,
        "rollout_batches": last["batches_started"],
        "rollout_stages": stage_summary,
        "rollout_halt_within_bound": halted_within_bound,
        "scheduler_cpu_secs_rollout": cpu,
        "scheduler_rss_kib_rollout_max": rss_max,
        "poll_errors": poll_errors,
    });
    Ok((summary, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_task_after_a_stage_follows_the_scheduler_rules() {
        let stages = "pilot=1%,gray=20%,full=100%";
        // 10,000 agents: pilot 100 nodes in batches of 10% = 10 tasks.
        assert_eq!(fail_from_task(stages, "10%", 10_000, "pilot"), Some(11));
        // gray: 1,900 nodes in batches of 190 = 10 more.
        assert_eq!(fail_from_task(stages, "10%", 10_000, "gray"), Some(21));
        // 3 agents: pilot 1 node, one batch.
        assert_eq!(fail_from_task(stages, "50%", 3, "pilot"), Some(2));
        assert_eq!(fail_from_task(stages, "25", 10_000, "pilot"), Some(5));
        assert_eq!(fail_from_task(stages, "10%", 100, "canary"), None);
    }
}
