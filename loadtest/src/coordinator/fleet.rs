//! Scenario 5, the fleet (`--scenario fleet`): simulated agents connect, register and
//! heartbeat; once the scheduler lists them online, a heartbeat window measures the
//! scheduler's CPU and RSS; then one command task is fanned out to all of them and the
//! scheduler is polled until every result is stored (create -> first and last result,
//! scheduler CPU for the task). It owns that sequence and hands the variants to their
//! drivers: a staged rollout ([`crate::rollout`]), config pushes ([`crate::configpush`])
//! and the fault mode that kills a process while results flow ([`crate::failover`]); with
//! `--reconnect` (a gateway killed) the fault mode also reads the agents' recovery
//! ([`super::storm::recover`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Done, Driven, Run, Watched, lock, proc_rows};
use crate::client::BoxError;
use crate::http;
use crate::procfs;
use crate::report::Row;
use crate::worker::WorkerLine;

/// The scheduler's terminal target states: a result stored.
const TERMINAL: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

/// Agents register and heartbeat; one command task is fanned out to all (or a rollout, a
/// config push, a fault); time until the scheduler has stored every result.
pub(super) async fn fleet(run: &Run) -> Driven {
    let args = &run.args;
    let addrs: Vec<SocketAddr> = args
        .scheduler
        .split(',')
        .map(|a| a.trim().parse())
        .collect::<Result<_, _>>()?;
    let addr = *addrs.first().ok_or("--scheduler names no address")?;
    let online = connect_and_register(run, addr).await?;
    let sched = run.watched.iter().find(|w| w.name == "scheduler").cloned();
    let hb = heartbeat_window(run, sched.as_ref()).await;
    if let Some(pid) = args.kill_scheduler {
        return fault(run, addrs, pid, &online).await;
    }
    if args.rollout || args.config_push {
        return staged(run, addr, sched.as_ref(), &online, &hb).await;
    }
    let task_cpu0 = sched.as_ref().and_then(|w| procfs::cpu_secs(w.pid));
    let created = create_task(run, addr).await?;
    let polled = poll_task(run, addr, &created).await;
    // The workers report once a second: let their counters (tasks, results, acks) catch up.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) && run.agg().totals.result_acks < polled.stored
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (totals, hs) = {
        let agg = run.agg();
        (agg.totals.clone(), agg.hs.clone())
    };
    let end = TaskEnd {
        cpu: cpu_since(task_cpu0, sched.as_ref()),
        sched_rss: sched.as_ref().and_then(|w| procfs::rss_kib(w.pid)),
        totals,
        hs,
    };
    let task = Task {
        online: &online,
        hb: &hb,
        created: &created,
        polled: &polled,
        end: &end,
    };
    let mut summary = task.summary();
    let mut rows = task.rows();
    proc_rows(run, &mut summary, &mut rows, 0);
    Ok(Done::Ready(summary, rows))
}

/// The agents as connected and as the scheduler lists them.
struct Online {
    /// Connections open once every worker finished opening.
    open: u64,
    /// Seconds the opening took.
    open_secs: f64,
    /// Agents the scheduler lists online.
    online: u64,
    /// All connected -> all online, seconds.
    registered_secs: f64,
}

/// Waits until every agent is connected, then until the scheduler lists them online.
async fn connect_and_register(run: &Run, addr: SocketAddr) -> Result<Online, BoxError> {
    let t0 = Instant::now();
    let all = run.wait_opened(run.remaining()).await;
    let open_secs = run
        .agg()
        .open_secs()
        .unwrap_or_else(|| t0.elapsed().as_secs_f64());
    let open = run.agg().open_now();
    if !all || open == 0 {
        return Err("agents did not all connect within --max-secs".into());
    }
    let mut online = 0u64;
    let reg_t0 = Instant::now();
    while run.remaining() > Duration::from_secs(5) {
        if let Ok(r) = http::request(
            addr,
            reqwest::Method::GET,
            "/v1/agents?label=fleet%3Dloadtest&state=online",
            &run.args.api_key,
            None,
            Duration::from_secs(30),
        )
        .await
        {
            online = r.json()["agents"]
                .as_array()
                .map(|a| a.len() as u64)
                .unwrap_or(0);
        }
        if online >= open {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Online {
        open,
        open_secs,
        online,
        registered_secs: reg_t0.elapsed().as_secs_f64(),
    })
}

/// The scheduler while every agent heartbeats and nothing else happens.
struct Heartbeat {
    secs: f64,
    /// Scheduler CPU seconds over the window.
    cpu: Option<f64>,
    rss_max: u64,
}

impl Heartbeat {
    /// Scheduler CPU over the window, percent of one core.
    fn pct(&self) -> Option<f64> {
        self.cpu.map(|c| 100.0 * c / self.secs.max(1e-3))
    }
}

/// `--hold-secs` of heartbeats: scheduler CPU and the highest RSS.
async fn heartbeat_window(run: &Run, sched: Option<&Watched>) -> Heartbeat {
    let cpu0 = sched.and_then(|w| procfs::cpu_secs(w.pid));
    let t0 = Instant::now();
    let mut rss_max = 0u64;
    let hold = Duration::from_secs(run.args.hold_secs).min(run.remaining());
    while t0.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(r) = sched.and_then(|w| procfs::rss_kib(w.pid)) {
            rss_max = rss_max.max(r);
        }
    }
    Heartbeat {
        secs: t0.elapsed().as_secs_f64(),
        cpu: cpu_since(cpu0, sched),
        rss_max,
    }
}

/// CPU seconds `sched` used since it had `cpu0`.
fn cpu_since(cpu0: Option<f64>, sched: Option<&Watched>) -> Option<f64> {
    match (cpu0, sched.and_then(|w| procfs::cpu_secs(w.pid))) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    }
}

/// The command's argv.
fn argv(run: &Run) -> Vec<String> {
    run.args
        .command
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Fault mode: [`crate::failover::drive`] kills `pid` once enough results are stored.
async fn fault(run: &Run, addrs: Vec<SocketAddr>, pid: u32, online: &Online) -> Driven {
    let args = &run.args;
    let agg = Arc::clone(&run.agg);
    let (extra, extra_rows) = crate::failover::drive(
        crate::failover::Plan {
            addrs,
            key: &args.api_key,
            argv: argv(run),
            timeout_ms: args.task_timeout_ms,
            agents: online.online,
            kill_pid: pid,
            kill_after_results: args.kill_after_results,
            kill_label: &args.kill_label,
            deadline: Instant::now() + run.remaining(),
        },
        move || {
            let t = &lock(&agg).totals;
            (t.tasks, t.results, t.result_acks, t.resent)
        },
    )
    .await?;
    // A gateway was killed: every agent it held must be back (and registered again).
    let recovery = if args.reconnect {
        Some(super::storm::recover(run).await)
    } else {
        None
    };
    let mut summary = json!({
        "agents": online.open,
        "agents_online_at_scheduler": online.online,
    });
    super::storm::merge(&mut summary, &extra);
    let mut rows = vec![Row::new(
        "agents connected / online at scheduler",
        format!("{} / {}", online.open, online.online),
    )];
    rows.extend(extra_rows);
    if let Some((r, r_rows)) = recovery {
        super::storm::merge(&mut summary, &r);
        rows.extend(r_rows);
    }
    proc_rows(run, &mut summary, &mut rows, 0);
    Ok(Done::Ready(summary, rows))
}

/// A staged rollout or config pushes instead of the one task.
async fn staged(
    run: &Run,
    addr: SocketAddr,
    sched: Option<&Watched>,
    online: &Online,
    hb: &Heartbeat,
) -> Driven {
    let args = &run.args;
    let deadline = Instant::now() + run.remaining();
    let (extra, extra_rows) = if args.rollout {
        crate::rollout::drive(crate::rollout::Plan {
            addr,
            key: &args.api_key,
            stages: &args.rollout_stages,
            batch: &args.rollout_batch,
            max_failure_percent: args.rollout_max_failure_percent,
            argv: argv(run),
            scheduler_pid: sched.map(|w| w.pid),
            deadline,
        })
        .await?
    } else {
        crate::configpush::drive(crate::configpush::Plan {
            addr,
            key: &args.api_key,
            agents: online.online,
            prefix: &run.prefix,
            single: args.config_single,
            scheduler_pid: sched.map(|w| w.pid),
            deadline,
        })
        .await?
    };
    let mut summary = json!({
        "agents": online.open,
        "agents_online_at_scheduler": online.online,
        "connect_secs": online.open_secs,
        "register_to_online_secs": online.registered_secs,
        "scheduler_cpu_pct_heartbeat": hb.pct(),
        "scheduler_rss_kib_heartbeat_max": hb.rss_max,
    });
    super::storm::merge(&mut summary, &extra);
    let mut rows = vec![Row::new(
        "agents connected / online at scheduler",
        format!(
            "{} / {} ({:.1} s to all online)",
            online.open, online.online, online.registered_secs
        ),
    )];
    rows.extend(extra_rows);
    proc_rows(run, &mut summary, &mut rows, 0);
    Ok(Done::Ready(summary, rows))
}

/// The task as created.
struct Created {
    task_id: u64,
    dispatched: u64,
    create_ms: f64,
    at: Instant,
}

/// `POST /v1/tasks`: the command to every agent of the fleet label.
async fn create_task(run: &Run, addr: SocketAddr) -> Result<Created, BoxError> {
    let req = json!({
        "targets": {"labels": {"fleet": "loadtest"}},
        "spec": {"kind": "command", "argv": argv(run)},
        "timeout_ms": run.args.task_timeout_ms,
    });
    let at = Instant::now();
    let resp = http::request(
        addr,
        reqwest::Method::POST,
        "/v1/tasks",
        &run.args.api_key,
        Some(&req),
        run.remaining().max(Duration::from_secs(1)),
    )
    .await?;
    let create_ms = at.elapsed().as_secs_f64() * 1000.0;
    if resp.status != 201 {
        return Err(format!(
            "create task: HTTP {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )
        .into());
    }
    let j = resp.json();
    Ok(Created {
        task_id: j["task_id"].as_u64().ok_or("create task: no task_id")?,
        dispatched: j["dispatched"].as_u64().unwrap_or(0),
        create_ms,
        at,
    })
}

/// The task as the scheduler's listing last showed it.
#[derive(Default)]
struct Polled {
    stored: u64,
    first_result_s: Option<f64>,
    finished: bool,
    states: Value,
    poll_errors: u64,
    /// Create -> the last poll, seconds.
    all_stored_s: f64,
}

/// Polls the scheduler's task listing until every target is terminal (or `--max-secs`),
/// noting the stored count in the timeline.
async fn poll_task(run: &Run, addr: SocketAddr, created: &Created) -> Polled {
    let mut p = Polled::default();
    while run.remaining() > Duration::ZERO {
        match http::request(
            addr,
            reqwest::Method::GET,
            "/v1/tasks?limit=5",
            &run.args.api_key,
            None,
            Duration::from_secs(30),
        )
        .await
        {
            Ok(r) => {
                let j = r.json();
                if let Some(t) = j["tasks"].as_array().and_then(|a| {
                    a.iter()
                        .find(|t| t["task_id"].as_u64() == Some(created.task_id))
                }) {
                    p.states = t["states"].clone();
                    p.stored = TERMINAL.iter().filter_map(|k| p.states[*k].as_u64()).sum();
                    p.finished = t["finished"].as_bool().unwrap_or(false);
                }
            }
            Err(_) => p.poll_errors += 1,
        }
        if p.stored > 0 && p.first_result_s.is_none() {
            p.first_result_s = Some(created.at.elapsed().as_secs_f64());
        }
        {
            let t = run.t();
            run.agg().second(t).stored = Some(p.stored);
        }
        if p.finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    p.all_stored_s = created.at.elapsed().as_secs_f64();
    p
}

/// After the task: the scheduler's figures and the agents' counters.
struct TaskEnd {
    cpu: Option<f64>,
    sched_rss: Option<u64>,
    totals: WorkerLine,
    hs: crate::hist::Hist,
}

/// Everything the one-task run measured, for its summary and rows.
struct Task<'a> {
    online: &'a Online,
    hb: &'a Heartbeat,
    created: &'a Created,
    polled: &'a Polled,
    end: &'a TaskEnd,
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{v:.2}{unit}"))
}

impl Task<'_> {
    fn summary(&self) -> Value {
        let Task {
            online: o,
            hb,
            created: c,
            polled: p,
            end: e,
        } = self;
        json!({
            "agents": o.open,
            "agents_online_at_scheduler": o.online,
            "connect_secs": o.open_secs,
            "handshake_p50_ms": e.hs.ms(50.0),
            "handshake_p99_ms": e.hs.ms(99.0),
            "connect_errors": e.totals.connect_errors,
            "register_to_online_secs": o.registered_secs,
            "heartbeat_window_secs": hb.secs,
            "scheduler_cpu_secs_heartbeat": hb.cpu,
            "scheduler_cpu_pct_heartbeat": hb.pct(),
            "scheduler_rss_kib_heartbeat_max": hb.rss_max,
            "task_id": c.task_id,
            "task_create_ms": c.create_ms,
            "dispatched": c.dispatched,
            "tasks_received_by_agents": e.totals.tasks,
            "results_sent": e.totals.results,
            "results_acked": e.totals.result_acks,
            "results_stored": p.stored,
            "task_finished": p.finished,
            "task_states": p.states,
            "first_result_stored_secs": p.first_result_s,
            "all_results_stored_secs": if p.finished { Some(p.all_stored_s) } else { None },
            "scheduler_cpu_secs_task": e.cpu,
            "scheduler_rss_kib_end": e.sched_rss,
            "poll_errors": p.poll_errors,
        })
    }

    fn rows(&self) -> Vec<Row> {
        let Task {
            online: o,
            hb,
            end: e,
            ..
        } = self;
        let mut rows = vec![
            Row::new(
                "agents connected / online at scheduler",
                format!("{} / {}", o.open, o.online),
            ),
            Row::new(
                "connect time, handshake p50 / p99",
                format!(
                    "{:.1} s, {:.1} / {:.1} ms",
                    o.open_secs,
                    e.hs.ms(50.0),
                    e.hs.ms(99.0)
                ),
            ),
            Row::new(
                "all connected -> all online",
                format!("{:.1} s", o.registered_secs),
            ),
            Row::new(
                "scheduler CPU while all heartbeat",
                format!(
                    "{} over {:.0} s ({} of one core)",
                    opt(hb.cpu, " s"),
                    hb.secs,
                    opt(hb.pct(), "%")
                ),
            ),
            Row::new(
                "scheduler RSS (heartbeat max, end)",
                format!(
                    "{:.1} MiB, {}",
                    hb.rss_max as f64 / 1024.0,
                    opt(e.sched_rss.map(|r| r as f64 / 1024.0), " MiB")
                ),
            ),
        ];
        rows.extend(self.task_rows());
        rows
    }

    fn task_rows(&self) -> Vec<Row> {
        let Task {
            created: c,
            polled: p,
            end: e,
            ..
        } = self;
        vec![
            Row::new(
                "POST /v1/tasks (create + dispatch to all)",
                format!("{:.0} ms, {} dispatched", c.create_ms, c.dispatched),
            ),
            Row::new(
                "agents: tasks received / results sent / results acked",
                format!(
                    "{} / {} / {}",
                    e.totals.tasks, e.totals.results, e.totals.result_acks
                ),
            ),
            Row::new("create -> first result stored", opt(p.first_result_s, " s")),
            Row::new(
                "create -> all results stored",
                if p.finished {
                    format!("{:.2} s ({} stored)", p.all_stored_s, p.stored)
                } else {
                    format!(
                        "NOT FINISHED after {:.1} s ({} stored)",
                        p.all_stored_s, p.stored
                    )
                },
            ),
            Row::new("scheduler CPU for the task", opt(e.cpu, " s")),
        ]
    }
}
