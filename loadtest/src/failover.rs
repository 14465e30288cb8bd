//! The fleet scenario's scheduler-loss mode (fault suite, `loadtest/scenarios/faults/`):
//! once the simulated agents are online, one command task goes to all of them through the
//! active scheduler; when `kill_after_results` results are stored, the active scheduler is
//! killed with SIGKILL; the standby takes over. The figures: time until the standby
//! answers, time until every result is stored, and the proof that nothing was lost or run
//! twice: results stored = targets, tasks received by the agents = targets, no target with
//! a second attempt. The killed pid may be another process (`kill_label`: a NATS node, a
//! gateway); then no takeover is waited for, only every result.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::http;
use crate::report::Row;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The default `--kill-label`: the killed pid is the active scheduler.
pub(crate) const SCHEDULER_LABEL: &str = "the active scheduler";

/// What the coordinator passes in.
pub(crate) struct Plan<'a> {
    /// Every scheduler instance; the active one answers, a standby says 503.
    pub addrs: Vec<SocketAddr>,
    /// API key.
    pub key: &'a str,
    /// The command.
    pub argv: Vec<String>,
    /// The task's attempt timeout, ms.
    pub timeout_ms: u64,
    /// Agents online.
    pub agents: u64,
    /// The active scheduler's pid, killed with SIGKILL.
    pub kill_pid: u32,
    /// Kill once this many results are stored (0: right after the task was created).
    pub kill_after_results: u64,
    /// What `kill_pid` is: the default scheduler label waits for a standby's takeover,
    /// anything else (a NATS node) only for every result.
    pub kill_label: &'a str,
    /// When to give up.
    pub deadline: Instant,
}

/// One call to whichever instance is active: the first that answers with anything but
/// 503 (a standby's answer) or a connection error. Returns its index too.
async fn active(
    plan: &Plan<'_>,
    prefer: usize,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> Option<(usize, http::Response)> {
    let n = plan.addrs.len();
    for k in 0..n {
        let i = (prefer + k) % n;
        if let Ok(r) = http::request(
            plan.addrs[i],
            method.clone(),
            path,
            plan.key,
            body,
            Duration::from_secs(30),
        )
        .await
            && r.status != 503
        {
            return Some((i, r));
        }
    }
    None
}

/// Runs the fault; `totals` reads the agents' counters (tasks received, results sent,
/// results acked, results sent again).
pub(crate) async fn drive(
    plan: Plan<'_>,
    totals: impl Fn() -> (u64, u64, u64, u64),
) -> Result<(Value, Vec<Row>), Error> {
    let req = json!({
        "targets": {"labels": {"fleet": "loadtest"}},
        "spec": {"kind": "command", "argv": plan.argv},
        "timeout_ms": plan.timeout_ms,
    });
    let created = Instant::now();
    let (mut current, resp) = active(&plan, 0, reqwest::Method::POST, "/v1/tasks", Some(&req))
        .await
        .ok_or("no scheduler instance is active")?;
    if resp.status != 201 {
        return Err(format!("create task: HTTP {}: {}", resp.status, resp.json()).into());
    }
    let task_id = resp.json()["task_id"]
        .as_u64()
        .ok_or("create task: no task_id")?;
    let killed_on = current;
    let mut killed: Option<Instant> = None;
    let mut stored_at_kill = 0;
    let mut acked_at_kill = 0;
    let mut takeover_secs = None;
    let mut stored = 0;
    let mut finished = false;
    let mut kill = |stored: u64| -> Result<Instant, Error> {
        let status = std::process::Command::new("kill")
            .args(["-9", &plan.kill_pid.to_string()])
            .status()?;
        if !status.success() {
            return Err(format!("kill -9 {} failed", plan.kill_pid).into());
        }
        stored_at_kill = stored;
        acked_at_kill = totals().2;
        Ok(Instant::now())
    };
    if plan.kill_after_results == 0 {
        killed = Some(kill(0)?);
    }
    let scheduler_killed = plan.kill_label == SCHEDULER_LABEL;
    while Instant::now() < plan.deadline {
        if let Some((i, r)) = active(
            &plan,
            current,
            reqwest::Method::GET,
            "/v1/tasks?limit=5",
            None,
        )
        .await
        {
            if let Some(t) = killed
                && takeover_secs.is_none()
                && i != killed_on
            {
                takeover_secs = Some(t.elapsed().as_secs_f64());
            }
            current = i;
            let j = r.json();
            if let Some(t) = j["tasks"]
                .as_array()
                .and_then(|a| a.iter().find(|t| t["task_id"].as_u64() == Some(task_id)))
            {
                let states = &t["states"];
                stored = ["succeeded", "failed", "timed_out", "cancelled"]
                    .iter()
                    .filter_map(|k| states[*k].as_u64())
                    .sum();
                finished = t["finished"].as_bool().unwrap_or(false);
            }
        }
        if killed.is_none() && stored >= plan.kill_after_results {
            killed = Some(kill(stored)?);
        }
        // Done when every result is stored and the standby has answered since the kill
        // (it took over).
        if finished && killed.is_some() && (takeover_secs.is_some() || !scheduler_killed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_secs = created.elapsed().as_secs_f64();
    // The agents report once a second: let their counters settle.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (tasks, results, acks, resent) = totals();
    let mut second_attempts = 0u64;
    let mut states = Value::Null;
    if let Some((_, r)) = active(
        &plan,
        current,
        reqwest::Method::GET,
        &format!("/v1/tasks/{task_id}"),
        None,
    )
    .await
    {
        let t = r.json();
        if let Some(targets) = t["targets"].as_object() {
            second_attempts = targets
                .values()
                .filter(|s| s["attempts"].as_u64().unwrap_or(0) > 1)
                .count() as u64;
        }
        states = t["states"].clone();
    }
    let rows = vec![
        Row::new(
            format!("killed {}", plan.kill_label),
            match killed {
                Some(_) => format!(
                    "after {stored_at_kill} of {} results were stored ({acked_at_kill} acknowledged to the agents)",
                    plan.agents
                ),
                None => "NEVER".to_owned(),
            },
        ),
        Row::new(
            "kill -> standby answers",
            takeover_secs.map_or(
                if scheduler_killed {
                    "NEVER"
                } else {
                    "n/a (no scheduler killed)"
                }
                .to_owned(),
                |s| format!("{s:.2} s"),
            ),
        ),
        Row::new(
            "create -> all results stored",
            if finished {
                format!("{all_secs:.2} s ({stored} stored)")
            } else {
                format!("NOT FINISHED after {all_secs:.1} s ({stored} stored)")
            },
        ),
        Row::new(
            "agents: tasks received / results sent / results acked",
            format!("{tasks} / {results} / {acks} (targets {})", plan.agents),
        ),
        Row::new("results sent again (unacknowledged)", resent.to_string()),
        Row::new("targets with a second attempt", second_attempts.to_string()),
    ];
    let summary = json!({
        "task_id": task_id,
        "killed_after_results": stored_at_kill,
        "results_acked_before_kill": acked_at_kill,
        "takeover_secs": takeover_secs,
        "task_finished": finished,
        "all_results_stored_secs": finished.then_some(all_secs),
        "results_stored": stored,
        "tasks_received_by_agents": tasks,
        "results_sent": results,
        "results_acked": acks,
        "results_resent": resent,
        "second_attempts": second_attempts,
        "results_missing": plan.agents.saturating_sub(stored),
        "tasks_received_extra": tasks.saturating_sub(plan.agents),
        "task_states": states,
    });
    Ok((summary, rows))
}
