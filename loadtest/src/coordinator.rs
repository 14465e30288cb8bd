//! The parent of a multi-process run (`loadtest run`): splits the connections over worker
//! processes (itself, re-executed as `loadtest worker`), reads their per-second JSON lines
//! into one timeline, samples the watched server processes from `/proc`, shows a live
//! progress line, drives the scenario (connect storm, periodic broadcast with or without
//! receipts and churn, fleet task fan-out) and hands the results to [`crate::report`].
//! Every run is bounded: connections and rate by its arguments, time by `--max-secs`
//! (workers get a hard deadline a little later and stop on their own).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::client::{self, BoxError};
use crate::hist::Hist;
use crate::http;
use crate::procfs;
use crate::report::{self, Row};
use crate::worker::{Role, WorkerLine, WorkerSpec};

/// Which scenario the parent drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// Open every connection at the target rate, hold, report connects/s, handshake
    /// latency, errors and server memory per connection.
    Storm,
    /// Periodic broadcast to all (with or without receipts, optional churn).
    Broadcast,
    /// Simulated agents: register, heartbeat, one command task fanned out to all.
    Fleet,
}

/// How broadcasts are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Via {
    /// `POST /v1/push` on ws-api (the product path; receipts counted by ws-api).
    Api,
    /// Straight on the bus (`ws.all`), bypassing ws-api.
    Nats,
}

/// Arguments of `loadtest run`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// Scenario to drive.
    #[arg(long, value_enum)]
    pub scenario: Kind,
    /// Name of the run (file names, report title).
    #[arg(long, default_value = "run")]
    pub name: String,
    /// Worker processes (each holds at most ~19,900 sockets here).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Target connects per second over all workers (0 = as fast as possible).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Hard bound on the whole run, seconds.
    #[arg(long, default_value_t = 300)]
    pub max_secs: u64,
    /// Seconds to hold once every connection is open (storm) or to measure heartbeats
    /// (fleet) before the task.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// Broadcast: seconds between pushes.
    #[arg(long, default_value_t = 5.0)]
    pub interval_secs: f64,
    /// Broadcast: pushes to send.
    #[arg(long, default_value_t = 12)]
    pub pushes: u64,
    /// Broadcast: body size, bytes (at least 16: send time and sequence are stamped in).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Broadcast: ask for delivery receipts (clients ack every push).
    #[arg(long)]
    pub receipts: bool,
    /// Broadcast: seconds to wait after the last push before reading ws-api's receipt
    /// counts (they are updated asynchronously).
    #[arg(long, default_value_t = 5)]
    pub receipt_wait_secs: u64,
    /// Broadcast: fraction of connections closed and reopened every second.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Broadcast peer: the clients subscribe on nats-server's own WebSocket listener
    /// (`--urls` point at it) and pushes are published on `bench.all`; no gateway involved.
    #[arg(long)]
    pub peer_nats_ws: bool,
    /// Broadcast: publish through ws-api or straight on NATS.
    #[arg(long, value_enum, default_value_t = Via::Api)]
    pub via: Via,
    /// ws-api address (host:port).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub api: String,
    /// API key for ws-api and the scheduler.
    #[arg(
        long,
        env = "LOADTEST_API_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub api_key: String,
    /// NATS URL (broadcast `--via nats`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Scheduler address (host:port) for the fleet scenario.
    #[arg(long, default_value = "127.0.0.1:8100")]
    pub scheduler: String,
    /// Fleet: command the task runs (the simulated agents report success at once).
    #[arg(long, default_value = "true")]
    pub command: String,
    /// Fleet, diagnostic: simulated agents skip `agent.task.started` (the real agent sends
    /// it); shows what those messages cost the scheduler.
    #[arg(long)]
    pub agent_skip_started: bool,
    /// Fleet: instead of one task to all agents, one staged rollout of the command over
    /// all of them (auto-promoted, no pause), polled until it completes or halts.
    #[arg(long)]
    pub rollout: bool,
    /// Fleet rollout: stages, `name=size` comma-separated.
    #[arg(long, default_value = "pilot=1%,gray=20%,full=100%")]
    pub rollout_stages: String,
    /// Fleet rollout: batch size, a count or a percentage of the stage.
    #[arg(long, default_value = "10%")]
    pub rollout_batch: String,
    /// Fleet rollout: failures a stage tolerates, percent.
    #[arg(long, default_value_t = 5)]
    pub rollout_max_failure_percent: u8,
    /// Every connection lost (a gateway killed, say) is opened again to the next URL with
    /// docs/protocol.md 13.1's backoff; storm reports the recovery (time until all are
    /// back, loss -> welcome p50/p99/max, reconnects per second).
    #[arg(long)]
    pub reconnect: bool,
    /// Storm with `--reconnect`: seconds to wait for every connection to come back after
    /// the hold, at most.
    #[arg(long, default_value_t = 60)]
    pub recover_secs: u64,
    /// Fleet: simulated agents send a result again when it is still unacknowledged this
    /// long after it was sent, as services/agent does (0: never).
    #[arg(long, default_value_t = 15_000)]
    pub agent_resend_after_ms: u64,
    /// Fleet, fault: `kill -9` this pid (the active scheduler) during the task fan-out and
    /// follow the standby (give every instance in `--scheduler`, comma-separated).
    #[arg(long)]
    pub kill_scheduler: Option<u32>,
    /// Fleet, fault: kill once this many results are stored (0: right after the create).
    #[arg(long, default_value_t = 0)]
    pub kill_after_results: u64,
    /// Fleet, fault: what the `--kill-scheduler` pid is, for the report. Anything but the
    /// default (e.g. `a NATS node`) means no takeover is waited for: the run ends when
    /// every result is stored.
    #[arg(long, default_value = "the active scheduler")]
    pub kill_label: String,
    /// Fleet: instead of one task, time config pushes: `--config-single` documents to one
    /// agent each, then one to all agents.
    #[arg(long, conflicts_with = "rollout")]
    pub config_push: bool,
    /// Fleet config push: single-agent pushes to time.
    #[arg(long, default_value_t = 100)]
    pub config_single: u64,
    /// Fleet: this percentage of the simulated agents fails its tasks (exit code 1)...
    #[arg(long, default_value_t = 0)]
    pub agent_fail_percent: u8,
    /// ...from the first batch after this rollout stage on (with `--rollout`; assumes a
    /// fresh scheduler, whose task ids start at 1). Without it they fail every task.
    #[arg(long)]
    pub agent_fail_after_stage: Option<String>,
    /// Fleet: the task's timeout, ms.
    #[arg(long, default_value_t = 300_000)]
    pub task_timeout_ms: u64,
    /// Process ids of the servers behind `--urls`, in their order (`pid` or `name=pid`;
    /// named gw1, gw2, ... by default): memory and CPU per connection.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pids: Vec<String>,
    /// Other processes to sample, `name=pid`, comma-separated (nats, ws-api, scheduler).
    #[arg(long, value_delimiter = ',')]
    pub watch: Vec<String>,
    /// Directory for `<name>.json` and `<name>.html`.
    #[arg(long, default_value = "loadtest-results")]
    pub out: std::path::PathBuf,
    /// Thresholds file (TOML, `[min]` and `[max]` tables over summary keys).
    #[arg(long)]
    pub thresholds: Option<std::path::PathBuf>,
    /// Memory trend of the gateways from this many seconds after the start to the last
    /// push (broadcast) or the end: slope, KiB per reconnect, samples ([`crate::trend`]).
    #[arg(long)]
    pub rss_warmup_secs: Option<u64>,
    /// Extra `key=value` notes recorded in the results (command, pinning).
    #[arg(long, value_delimiter = ',')]
    pub note: Vec<String>,
}

/// One second of the run, all workers and samples merged (read back from a run's JSON by
/// [`crate::hostile::verdict`]).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub(crate) struct Second {
    /// Seconds since the run started.
    pub t: u64,
    /// Connections open at the end of the second.
    pub open: u64,
    /// Handshakes completed.
    pub connects: u64,
    /// Failed attempts.
    pub connect_errors: u64,
    /// Server-side closes / losses.
    pub closed: u64,
    /// Churn closes.
    pub churned: u64,
    /// Pushes received by clients.
    pub recv: u64,
    /// Receipts sent by clients.
    pub acks: u64,
    /// Agent register messages.
    pub registered: u64,
    /// Tasks received by agents.
    pub tasks: u64,
    /// Results sent by agents.
    pub results: u64,
    /// Result ids acknowledged by the scheduler.
    pub result_acks: u64,
    /// Results and config acks agents sent again (unacknowledged too long).
    pub resent: u64,
    /// Pushes published by the parent.
    pub pushes: u64,
    /// Results stored at the scheduler (fleet, polled).
    pub stored: Option<u64>,
    /// Handshake latency of the second.
    #[serde(skip)]
    pub hs: Hist,
    /// Push latency of the second.
    #[serde(skip)]
    pub lat: Hist,
    /// Handshake p50/p99, ms.
    pub hs_p50_ms: f64,
    /// Handshake p99, ms.
    pub hs_p99_ms: f64,
    /// Push latency p50, ms.
    pub lat_p50_ms: f64,
    /// Push latency p99, ms.
    pub lat_p99_ms: f64,
    /// Push latency max, ms.
    pub lat_max_ms: f64,
    /// Watched processes: name -> (RSS KiB, CPU % of one core over the second).
    pub procs: BTreeMap<String, (u64, f64)>,
}

/// Everything the parent knows about the run so far.
#[derive(Debug, Default)]
struct Agg {
    seconds: Vec<Second>,
    open: Vec<u64>,
    opened: Vec<bool>,
    started_at_us: Vec<u64>,
    opened_at_us: Vec<u64>,
    last_seen: Vec<bool>,
    per_push: BTreeMap<u64, u64>,
    gaps: u64,
    missed: u64,
    hs: Hist,
    lat: Hist,
    rc: Hist,
    totals: WorkerLine,
}

impl Agg {
    fn second(&mut self, t: u64) -> &mut Second {
        while self.seconds.len() as u64 <= t {
            let n = self.seconds.len() as u64;
            self.seconds.push(Second {
                t: n,
                ..Second::default()
            });
        }
        let i = t as usize;
        &mut self.seconds[i]
    }

    fn add(&mut self, t: u64, line: &WorkerLine) {
        let w = line.w;
        if let Some(o) = self.open.get_mut(w) {
            *o = line.open;
        }
        if let Some(o) = self.opened.get_mut(w) {
            *o = line.opened;
        }
        if let Some(o) = self.started_at_us.get_mut(w) {
            *o = line.started_at_us;
        }
        if let Some(o) = self.opened_at_us.get_mut(w) {
            *o = line.opened_at_us;
        }
        self.hs.merge(&line.hs);
        self.lat.merge(&line.lat);
        self.rc.merge(&line.rc);
        let tot = &mut self.totals;
        tot.connects += line.connects;
        tot.connect_errors += line.connect_errors;
        tot.closed += line.closed;
        tot.churned += line.churned;
        tot.recv += line.recv;
        tot.acks += line.acks;
        tot.registered += line.registered;
        tot.tasks += line.tasks;
        tot.results += line.results;
        tot.result_acks += line.result_acks;
        tot.resent += line.resent;
        tot.reconnects += line.reconnects;
        if line.last {
            if let Some(l) = self.last_seen.get_mut(w) {
                *l = true;
            }
            for (k, v) in &line.per_push {
                *self.per_push.entry(*k).or_insert(0) += v;
            }
            self.gaps += line.gaps;
            self.missed += line.missed;
        }
        let open: u64 = self.open.iter().sum();
        let s = self.second(t);
        s.open = open;
        s.connects += line.connects;
        s.connect_errors += line.connect_errors;
        s.closed += line.closed;
        s.churned += line.churned;
        s.recv += line.recv;
        s.acks += line.acks;
        s.registered += line.registered;
        s.tasks += line.tasks;
        s.results += line.results;
        s.result_acks += line.result_acks;
        s.resent += line.resent;
        s.hs.merge(&line.hs);
        s.lat.merge(&line.lat);
    }

    fn open_now(&self) -> u64 {
        self.open.iter().sum()
    }

    fn all_opened(&self) -> bool {
        self.opened.iter().all(|o| *o)
    }

    /// Seconds from the first worker's first attempt to the last worker's last first
    /// attempt finishing (the opening phase as the workers saw it).
    fn open_secs(&self) -> Option<f64> {
        let start = self
            .started_at_us
            .iter()
            .copied()
            .filter(|t| *t > 0)
            .min()?;
        if self.opened_at_us.contains(&0) {
            return None;
        }
        let end = self.opened_at_us.iter().copied().max()?;
        Some(end.saturating_sub(start) as f64 / 1e6)
    }
}

/// A watched process.
#[derive(Debug, Clone)]
struct Watched {
    name: String,
    pid: u32,
    /// Connections it holds (gateways), for per-connection figures.
    gateway_index: Option<usize>,
    base_rss: Option<u64>,
    base_cpu: Option<f64>,
}

struct Run {
    args: RunArgs,
    urls: Vec<String>,
    connections: usize,
    agg: Arc<Mutex<Agg>>,
    started: Instant,
    watched: Vec<Watched>,
    /// User id prefix of the connections (`<prefix>-<index>`).
    prefix: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Run {
    fn t(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn agg(&self) -> std::sync::MutexGuard<'_, Agg> {
        lock(&self.agg)
    }

    /// Waits until every worker finished opening, bounded by `limit`.
    async fn wait_opened(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.agg().all_opened() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn remaining(&self) -> Duration {
        Duration::from_secs(self.args.max_secs).saturating_sub(self.started.elapsed())
    }
}

/// Global options the parent passes down.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    /// Gateway URLs.
    pub urls: Vec<String>,
    /// Token secret.
    pub secret: String,
    /// Agent-token key (PEM) for simulated agents; empty when not given.
    pub agent_key: String,
    /// Connections over all workers.
    pub connections: usize,
    /// Source addresses per worker.
    pub sources: u8,
    /// Handshakes in flight per worker.
    pub concurrency: usize,
    /// User id prefix.
    pub user_prefix: String,
}

/// Runs a multi-process scenario end to end; returns whether every threshold held.
pub(crate) async fn run(common: Common, args: RunArgs) -> Result<bool, BoxError> {
    if common.urls.is_empty() {
        return Err("no --urls".into());
    }
    let workers = args.workers.max(1);
    if common.connections.div_ceil(workers) > 19_900 {
        return Err(format!(
            "{} connections over {workers} workers is more than 19,900 sockets per process; add --workers",
            common.connections
        )
        .into());
    }
    let mut watched = Vec::new();
    for (i, entry) in args.gateway_pids.iter().enumerate() {
        let (name, pid) = match entry.split_once('=') {
            Some((n, p)) => (n.to_owned(), p),
            None => (format!("gw{}", i + 1), entry.as_str()),
        };
        let pid: u32 = pid
            .parse()
            .map_err(|_| format!("--gateway-pids {entry}: bad pid"))?;
        watched.push(Watched {
            name,
            pid,
            gateway_index: Some(i),
            base_rss: procfs::rss_kib(pid),
            base_cpu: procfs::cpu_secs(pid),
        });
    }
    for w in &args.watch {
        let Some((name, pid)) = w.split_once('=') else {
            return Err(format!("--watch {w}: use name=pid").into());
        };
        let pid: u32 = pid.parse().map_err(|_| format!("--watch {w}: bad pid"))?;
        watched.push(Watched {
            name: name.to_owned(),
            pid,
            gateway_index: None,
            base_rss: procfs::rss_kib(pid),
            base_cpu: procfs::cpu_secs(pid),
        });
    }
    let role = if args.scenario == Kind::Fleet {
        Role::Agent
    } else if args.peer_nats_ws {
        Role::NatsWs
    } else {
        Role::Client
    };
    let agg = Arc::new(Mutex::new(Agg {
        open: vec![0; workers],
        opened: vec![false; workers],
        started_at_us: vec![0; workers],
        opened_at_us: vec![0; workers],
        last_seen: vec![false; workers],
        ..Agg::default()
    }));
    let run = Arc::new(Run {
        args: args.clone(),
        urls: common.urls.clone(),
        connections: common.connections,
        agg: Arc::clone(&agg),
        started: Instant::now(),
        watched,
        prefix: common.user_prefix.clone(),
    });

    let fail_from_task = match &args.agent_fail_after_stage {
        Some(stage) => crate::rollout::fail_from_task(
            &args.rollout_stages,
            &args.rollout_batch,
            common.connections as u64,
            stage,
        )
        .ok_or_else(|| format!("--agent-fail-after-stage {stage}: not one of --rollout-stages"))?,
        None => 0,
    };

    // Workers.
    let exe = std::env::current_exe()?;
    let per = common.connections / workers;
    let extra = common.connections % workers;
    let mut children: Vec<(Child, Option<ChildStdin>)> = Vec::new();
    let mut readers = Vec::new();
    let mut first = 0usize;
    for w in 0..workers {
        let count = per + usize::from(w < extra);
        let spec = WorkerSpec {
            index: w,
            urls: common.urls.clone(),
            secret: common.secret.clone(),
            agent_key: common.agent_key.clone(),
            first,
            count,
            rate: if args.rate > 0.0 {
                args.rate / workers as f64
            } else {
                0.0
            },
            concurrency: common.concurrency,
            source_first: (2 + w * usize::from(common.sources.max(1))).min(250) as u8,
            sources: common.sources,
            user_prefix: common.user_prefix.clone(),
            role,
            churn_per_sec: args.churn,
            max_secs: args.max_secs + 30,
            skip_started: args.agent_skip_started,
            fail_percent: args.agent_fail_percent,
            fail_from_task,
            resend_after_ms: args.agent_resend_after_ms,
            reconnect: args.reconnect,
        };
        first += count;
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg("--spec")
            .arg(serde_json::to_string(&spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("worker without stdout")?;
        let stdin = child.stdin.take();
        children.push((child, stdin));
        let run = Arc::clone(&run);
        readers.push(tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                match serde_json::from_str::<WorkerLine>(&l) {
                    Ok(line) => {
                        let t = run.t();
                        lock(&run.agg).add(t, &line);
                    }
                    Err(e) => eprintln!("worker {w}: unreadable line ({e}): {l}"),
                }
            }
        }));
    }

    // Sampler and progress line.
    let (stop_sampler, sampler_stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample(Arc::clone(&run), sampler_stopped));

    let driven = match args.scenario {
        Kind::Storm => storm(&run).await,
        Kind::Broadcast => broadcast(&run).await,
        Kind::Fleet => fleet(&run).await,
    };

    // Stop the workers, collect their last lines, reap them.
    for (_, stdin) in &mut children {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(b"stop\n").await;
            let _ = s.flush().await;
        }
    }
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(30), r).await;
    }
    for (mut child, stdin) in children {
        drop(stdin);
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    let _ = stop_sampler.send(true);
    let _ = sampler.await;
    eprintln!();
    let (mut summary, mut rows) = match driven? {
        Done::Ready(summary, rows) => (summary, rows),
        Done::Broadcast(b) => broadcast_summary(&run, *b),
    };
    let run = Arc::try_unwrap(run).map_err(|_| "run still shared")?;
    let mut agg = lock(&run.agg).seconds.clone();
    for s in &mut agg {
        s.hs_p50_ms = s.hs.ms(50.0);
        s.hs_p99_ms = s.hs.ms(99.0);
        s.lat_p50_ms = s.lat.ms(50.0);
        s.lat_p99_ms = s.lat.ms(99.0);
        s.lat_max_ms = s.lat.ms(100.0);
    }
    summary["name"] = args.name.clone().into();
    summary["scenario"] = serde_json::to_value(args.scenario)?;
    summary["connections_target"] = run.connections.into();
    summary["workers"] = workers.into();
    summary["urls"] = run.urls.clone().into();
    summary["machine"] = procfs::machine();
    let notes: BTreeMap<String, String> = args
        .note
        .iter()
        .filter_map(|n| n.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    summary["notes"] = serde_json::to_value(&notes)?;
    if let Some(warmup) = args.rss_warmup_secs {
        let gateways: Vec<String> = run
            .watched
            .iter()
            .filter(|w| w.gateway_index.is_some())
            .map(|w| w.name.clone())
            .collect();
        crate::trend::add(&agg, warmup, &gateways, &mut summary, &mut rows);
    }
    let ok = report::apply_thresholds(args.thresholds.as_deref(), &mut summary, &mut rows)?;
    report::print_table(&args.name, &rows);
    let files = report::write(&args.out, &args.name, &summary, &rows, &agg)?;
    println!("results: {}", files.join(", "));
    Ok(ok)
}

/// Once a second: watched processes' RSS and CPU into the timeline, and the progress line.
async fn sample(run: Arc<Run>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last_cpu: BTreeMap<String, (f64, Instant)> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let t = run.t();
        let mut procs = BTreeMap::new();
        for w in &run.watched {
            let rss = procfs::rss_kib(w.pid).unwrap_or(0);
            let cpu = procfs::cpu_secs(w.pid).unwrap_or(0.0);
            let now = Instant::now();
            let pct = match last_cpu.insert(w.name.clone(), (cpu, now)) {
                Some((c0, t0)) => {
                    100.0 * (cpu - c0) / now.duration_since(t0).as_secs_f64().max(1e-3)
                }
                None => 0.0,
            };
            procs.insert(w.name.clone(), (rss, pct));
        }
        let line = {
            let mut agg = run.agg();
            let open = agg.open_now();
            let prev = agg
                .seconds
                .get(t.saturating_sub(1) as usize)
                .cloned()
                .unwrap_or_default();
            let s = agg.second(t);
            s.procs = procs.clone();
            s.open = open;
            let mut line = format!(
                "[{t:>4}s] open {open}/{} | conn/s {} err {} closed {} | recv/s {} acks/s {} | hs p99 {:.1} ms | lat p99 {:.1} ms",
                run.connections,
                prev.connects,
                prev.connect_errors,
                prev.closed,
                prev.recv,
                prev.acks,
                prev.hs.ms(99.0),
                prev.lat.ms(99.0),
            );
            if run.args.scenario == Kind::Fleet {
                line.push_str(&format!(
                    " | reg {} tasks {} results {}",
                    agg.totals.registered, agg.totals.tasks, agg.totals.results
                ));
            }
            for (name, (rss, pct)) in &procs {
                line.push_str(&format!(" | {name} {} MiB {pct:.0}%", rss / 1024));
            }
            line
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }
}

/// Watched-process figures over a window: CPU seconds used since `since` and RSS now.
fn proc_rows(run: &Run, summary: &mut serde_json::Value, rows: &mut Vec<Row>, connections: u64) {
    let per_gateway = if run.urls.is_empty() {
        0
    } else {
        connections / run.urls.len() as u64
    };
    for w in &run.watched {
        let rss = procfs::rss_kib(w.pid);
        let cpu = procfs::cpu_secs(w.pid);
        let key = w.name.replace('-', "_");
        summary[format!("{key}_rss_kib")] = rss.into();
        summary[format!("{key}_rss_kib_baseline")] = w.base_rss.into();
        if let (Some(r), Some(b)) = (rss, w.base_rss) {
            rows.push(Row::new(
                format!("{} RSS", w.name),
                format!(
                    "{:.1} MiB (baseline {:.1} MiB)",
                    r as f64 / 1024.0,
                    b as f64 / 1024.0
                ),
            ));
            if w.gateway_index.is_some() && per_gateway > 0 {
                let per = (r.saturating_sub(b)) as f64 * 1024.0 / per_gateway as f64;
                summary[format!("{key}_bytes_per_connection")] = per.into();
                rows.push(Row::new(
                    format!("{} memory per connection", w.name),
                    format!("{:.1} KB ({} connections)", per / 1000.0, per_gateway),
                ));
            }
        }
        if let (Some(c), Some(b)) = (cpu, w.base_cpu) {
            summary[format!("{key}_cpu_secs")] = (c - b).into();
            let mut text = format!("{:.2} s", c - b);
            if w.gateway_index.is_some() && per_gateway > 0 {
                let us = (c - b) * 1e6 / per_gateway as f64;
                summary[format!("{key}_cpu_us_per_connection")] = us.into();
                text.push_str(&format!(" ({us:.0} µs per connection held)"));
            }
            rows.push(Row::new(format!("{} CPU since start", w.name), text));
        }
    }
}

/// What a driver hands back: a finished summary, or (broadcast) what is needed to build
/// one once the workers' last lines (final delivery counts) are in.
enum Done {
    Ready(serde_json::Value, Vec<Row>),
    Broadcast(Box<BroadcastDone>),
}

struct BroadcastDone {
    pushed: Vec<Pushed>,
    receipts: Vec<serde_json::Value>,
    secs: f64,
    procs: serde_json::Value,
    proc_rows: Vec<Row>,
}

type Driven = Result<Done, BoxError>;

/// Scenario 1: everything opens at the target rate, is held, then closed.
async fn storm(run: &Run) -> Driven {
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
    let (open, totals, hs, peak) = {
        let agg = run.agg();
        let peak = agg.seconds.iter().map(|s| s.connects).max().unwrap_or(0);
        (agg.open_now(), agg.totals.clone(), agg.hs.clone(), peak)
    };
    let mut summary = serde_json::json!({
        "all_opened": all,
        "connections_open": open,
        "connects": totals.connects,
        "connect_errors": totals.connect_errors,
        "closed_by_server": totals.closed,
        "open_secs": open_secs,
        "connects_per_sec": totals.connects as f64 / open_secs.max(1e-3),
        "connects_per_sec_peak": peak,
        "target_rate": run.args.rate,
        "handshake_p50_ms": hs.ms(50.0),
        "handshake_p99_ms": hs.ms(99.0),
        "handshake_max_ms": hs.ms(100.0),
    });
    let mut rows = vec![
        Row::new(
            "connections open / target",
            format!("{open} / {}", run.connections),
        ),
        Row::new(
            "connect errors, server closes",
            format!("{}, {}", totals.connect_errors, totals.closed),
        ),
        Row::new(
            "time to open all",
            format!("{open_secs:.2} s (target rate {}/s)", run.args.rate),
        ),
        Row::new(
            "connects/s (mean, peak second)",
            format!(
                "{:.0}, {peak}",
                totals.connects as f64 / open_secs.max(1e-3)
            ),
        ),
        Row::new(
            "handshake p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.2} ms",
                hs.ms(50.0),
                hs.ms(99.0),
                hs.ms(100.0)
            ),
        ),
    ];
    if let Some((extra, extra_rows)) = recovery {
        if let (Some(s), Some(e)) = (summary.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        rows.extend(extra_rows);
    }
    proc_rows(run, &mut summary, &mut rows, open);
    Ok(Done::Ready(summary, rows))
}

/// Storm with `--reconnect`, after the hold (during which a fault script killed a
/// gateway): waits up to `--recover-secs` for every connection to be back, then reads the
/// recovery off the per-second record: the first second with connections missing, the
/// first one after it with all back, the reconnects per second in between, and each
/// connection's loss -> welcome time.
async fn recover(run: &Run) -> (serde_json::Value, Vec<Row>) {
    let until = Instant::now() + Duration::from_secs(run.args.recover_secs).min(run.remaining());
    let total = run.connections as u64;
    while Instant::now() < until && run.agg().open_now() < total {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The workers report once a second: let the last second land.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let agg = run.agg();
    let opened_at = agg.seconds.iter().position(|s| s.open >= total);
    let lost = opened_at.and_then(|o| {
        agg.seconds
            .iter()
            .enumerate()
            .skip(o)
            .find(|(_, s)| s.open < total)
            .map(|(i, _)| i)
    });
    let back = lost.and_then(|d| {
        agg.seconds
            .iter()
            .enumerate()
            .skip(d)
            .find(|(_, s)| s.open >= total)
            .map(|(i, _)| i)
    });
    let per_second: Vec<u64> = match (lost, back) {
        (Some(d), Some(b)) => agg.seconds[d..=b].iter().map(|s| s.connects).collect(),
        (Some(d), None) => agg.seconds[d..].iter().map(|s| s.connects).collect(),
        _ => Vec::new(),
    };
    let busy: Vec<u64> = per_second.iter().copied().filter(|c| *c > 0).collect();
    let mean = if busy.is_empty() {
        0.0
    } else {
        busy.iter().sum::<u64>() as f64 / busy.len() as f64
    };
    let peak = busy.iter().copied().max().unwrap_or(0);
    let rc = agg.rc.clone();
    let reconnects = agg.totals.reconnects;
    let lowest = lost
        .map(|d| agg.seconds[d..].iter().map(|s| s.open).min().unwrap_or(0))
        .unwrap_or(total);
    let closed = agg.totals.closed;
    let secs_to_all_back = match (lost, back) {
        (Some(d), Some(b)) => Some((b - d) as u64),
        _ => None,
    };
    std::mem::drop(agg);
    let summary = serde_json::json!({
        "lost_connections": closed,
        "lowest_open_in_a_second": lowest,
        "reconnects": reconnects,
        "all_back": back.is_some(),
        "seconds_to_all_back": secs_to_all_back,
        "reconnect_p50_ms": rc.ms(50.0),
        "reconnect_p99_ms": rc.ms(99.0),
        "reconnect_max_ms": rc.ms(100.0),
        "reconnects_per_second": per_second,
        "reconnects_peak_over_mean": if mean > 0.0 { peak as f64 / mean } else { 0.0 },
    });
    let rows = vec![
        Row::new(
            "connections lost, reconnected, fewest open in a second",
            format!("{closed}, {reconnects}, {lowest}"),
        ),
        Row::new(
            "loss -> all back",
            secs_to_all_back.map_or("NOT ALL BACK".to_owned(), |s| {
                format!("within {s} s (1 s resolution)")
            }),
        ),
        Row::new(
            "loss -> welcome per connection p50 / p99 / max",
            format!(
                "{:.0} / {:.0} / {:.0} ms",
                rc.ms(50.0),
                rc.ms(99.0),
                rc.ms(100.0)
            ),
        ),
        Row::new(
            "reconnects per second (from the loss)",
            format!(
                "{per_second:?}, peak/mean {:.2}",
                if mean > 0.0 { peak as f64 / mean } else { 0.0 }
            ),
        ),
    ];
    (summary, rows)
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

/// Scenarios 2-4: periodic broadcast, with or without receipts, with or without churn.
/// Route of the broadcast pushes (a valid route: `Route::new` cannot refuse it).
const BROADCAST_ROUTE: &str = "bench.broadcast";

async fn broadcast(run: &Run) -> Driven {
    let args = &run.args;
    if !run.wait_opened(run.remaining()).await {
        return Err("not every connection opened within --max-secs".into());
    }
    // Let presence catch up (ws-api counts its audience from it) before the first push.
    tokio::time::sleep(Duration::from_secs(2).min(run.remaining())).await;
    let via = if args.peer_nats_ws {
        Via::Nats
    } else {
        args.via
    };
    let api: Option<SocketAddr> = match via {
        Via::Api => Some(args.api.parse()?),
        Via::Nats => None,
    };
    let nats = match via {
        Via::Nats => Some(async_nats::connect(&args.nats_url).await?),
        Via::Api => None,
    };
    let interval = Duration::from_secs_f64(args.interval_secs.max(0.1));
    let mut pushed = Vec::new();
    let t0 = tokio::time::Instant::now();
    let broadcast_start = Instant::now();
    let route = messages::Route::new(BROADCAST_ROUTE).unwrap_or_default();
    for seq in 1..=args.pushes {
        if run.remaining() < interval {
            eprintln!("\nbroadcast: stopping early, --max-secs reached");
            break;
        }
        tokio::time::sleep_until(t0 + interval.mul_f64((seq - 1) as f64)).await;
        let open = run.agg().open_now();
        let body = client::stamped_body(seq, args.size);
        let at_s = run.started.elapsed().as_secs_f64();
        let sent = Instant::now();
        let mut p = Pushed {
            seq,
            at_s,
            open,
            http_ms: 0.0,
            push_id: None,
            targeted: None,
            error: None,
        };
        if let Some(addr) = api {
            let req = serde_json::json!({
                "target": {"all": true},
                "body_base64": base64::engine::general_purpose::STANDARD.encode(&body),
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
        } else if let (Some(nc), true) = (&nats, args.peer_nats_ws) {
            if let Err(e) = nc.publish(crate::natsws::SUBJECT, Bytes::from(body)).await {
                p.error = Some(e.to_string());
            } else {
                let _ = nc.flush().await;
            }
        } else if let Some(nc) = &nats {
            let push = messages::envelope::PushEnvelope {
                receipt: args.receipts,
                ..messages::envelope::PushEnvelope::new(
                    seq,
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
    // Grace for the last deliveries and acks.
    tokio::time::sleep(interval.min(run.remaining())).await;
    let broadcast_secs = broadcast_start.elapsed().as_secs_f64();
    // ws-api's own receipt counts.
    let mut receipts = Vec::new();
    if let (Some(addr), true) = (api, args.receipts) {
        tokio::time::sleep(Duration::from_secs(args.receipt_wait_secs).min(run.remaining())).await;
        for p in &pushed {
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
    }
    // Server memory and CPU while the connections are still held.
    let mut procs = serde_json::json!({});
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

/// Builds the broadcast summary once the workers' last lines are in.
fn broadcast_summary(run: &Run, done: BroadcastDone) -> (serde_json::Value, Vec<Row>) {
    let BroadcastDone {
        pushed,
        receipts,
        secs: broadcast_secs,
        procs,
        proc_rows: mut extra_rows,
    } = done;
    let agg = run.agg();
    let args = &run.args;
    let sent = pushed.iter().filter(|p| p.error.is_none()).count() as u64;
    // A push whose publish call failed (a timeout) may still have gone out: it counts as
    // expected once any client got it.
    let got = |seq: u64| agg.per_push.get(&seq).copied().unwrap_or(0);
    let counted: Vec<&Pushed> = pushed
        .iter()
        .filter(|p| p.error.is_none() || got(p.seq) > 0)
        .collect();
    let late_but_delivered = counted.iter().filter(|p| p.error.is_some()).count() as u64;
    let expected: u64 = counted.iter().map(|p| p.open).sum();
    let lost: u64 = counted
        .iter()
        .map(|p| p.open.saturating_sub(got(p.seq)))
        .sum();
    let delivered = agg.totals.recv;
    let acks = agg.totals.acks;
    let peak_recv = agg.seconds.iter().map(|s| s.recv).max().unwrap_or(0);
    let peak_acks = agg.seconds.iter().map(|s| s.acks).max().unwrap_or(0);
    let api_delivered: u64 = receipts
        .iter()
        .filter_map(|r| r["delivered"].as_u64())
        .sum();
    let api_acked: u64 = receipts.iter().filter_map(|r| r["acked"].as_u64()).sum();
    let api_targeted: u64 = receipts.iter().filter_map(|r| r["targeted"].as_u64()).sum();
    let http_ms: Vec<f64> = pushed.iter().map(|p| p.http_ms).collect();
    let http_max = http_ms.iter().copied().fold(0.0, f64::max);
    let lat = &agg.lat;
    let mut summary = serde_json::json!({
        "pushes_sent": sent,
        "push_errors": pushed.len() as u64 - sent,
        "push_errors_delivered_anyway": late_but_delivered,
        "interval_secs": args.interval_secs,
        "size": args.size,
        "receipts": args.receipts,
        "churn_per_sec": args.churn,
        "via": if args.peer_nats_ws { serde_json::json!("peer-nats-ws") } else { serde_json::to_value(args.via).unwrap_or_default() },
        "connections_open_at_last_push": pushed.last().map_or(0, |p| p.open),
        "expected_deliveries": expected,
        "delivered": delivered,
        "lost": lost,
        "lost_in_session_gaps": agg.gaps,
        "missed_while_connected": agg.missed,
        "delivered_per_sec_mean": delivered as f64 / broadcast_secs.max(1e-3),
        "delivered_per_sec_peak": peak_recv,
        "acks_sent": acks,
        "acks_per_sec_mean": acks as f64 / broadcast_secs.max(1e-3),
        "acks_per_sec_peak": peak_acks,
        "e2e_p50_ms": lat.ms(50.0),
        "e2e_p99_ms": lat.ms(99.0),
        "e2e_max_ms": lat.ms(100.0),
        "publish_call_max_ms": http_max,
        "reconnects": agg.totals.churned,
        "connect_errors": agg.totals.connect_errors,
        "closed_by_server": agg.totals.closed,
        "pushes": &pushed,
    });
    if !receipts.is_empty() {
        summary["api_targeted"] = api_targeted.into();
        summary["api_delivered"] = api_delivered.into();
        summary["api_acked"] = api_acked.into();
        summary["api_receipts"] = receipts.to_vec().into();
    }
    let mut rows = vec![
        Row::new(
            "pushes (size, every)",
            format!(
                "{sent} sent, {} failed of which {late_but_delivered} arrived anyway ({} B every {} s, via {}, receipts {})",
                pushed.len() as u64 - sent,
                args.size,
                args.interval_secs,
                if args.peer_nats_ws {
                    "the nats-server WebSocket peer".to_owned()
                } else {
                    format!("{:?}", args.via)
                },
                args.receipts
            ),
        ),
        Row::new(
            "connections open at the last push",
            pushed.last().map_or(0, |p| p.open).to_string(),
        ),
        Row::new(
            "deliveries: expected / received / lost",
            format!("{expected} / {delivered} / {lost}"),
        ),
        Row::new(
            "delivered/s (mean over the run, peak second)",
            format!(
                "{:.0}, {peak_recv}",
                delivered as f64 / broadcast_secs.max(1e-3)
            ),
        ),
        Row::new(
            "acks sent by clients, acks/s (mean, peak second)",
            format!(
                "{acks}, {:.0}, {peak_acks}",
                acks as f64 / broadcast_secs.max(1e-3)
            ),
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
        Row::new("slowest publish call", format!("{http_max:.1} ms")),
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
    if !receipts.is_empty() {
        rows.push(Row::new(
            "ws-api receipts: targeted / delivered / acked",
            format!("{api_targeted} / {api_delivered} / {api_acked}"),
        ));
    }
    rows.push(Row::new(
        "pushes missed inside a session: gaps / stamped while open, not received",
        format!("{} / {}", agg.gaps, agg.missed),
    ));
    if let (Some(obj), Some(p)) = (summary.as_object_mut(), procs.as_object()) {
        for (k, v) in p {
            obj.insert(k.clone(), v.clone());
        }
    }
    rows.append(&mut extra_rows);
    (summary, rows)
}

/// Scenario 5: agents register and heartbeat; one command task is fanned out to all; time
/// until the scheduler has stored every result.
async fn fleet(run: &Run) -> Driven {
    let args = &run.args;
    let addrs: Vec<SocketAddr> = args
        .scheduler
        .split(',')
        .map(|a| a.trim().parse())
        .collect::<Result<_, _>>()?;
    let addr = *addrs.first().ok_or("--scheduler names no address")?;
    let key = args.api_key.clone();
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
    // Wait until the scheduler lists them online.
    let mut online = 0u64;
    let reg_t0 = Instant::now();
    while run.remaining() > Duration::from_secs(5) {
        if let Ok(r) = http::request(
            addr,
            reqwest::Method::GET,
            "/v1/agents?label=fleet%3Dloadtest&state=online",
            &key,
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
    let registered_secs = reg_t0.elapsed().as_secs_f64();
    // Heartbeat window: scheduler CPU and RSS with every agent heartbeating.
    let sched = run.watched.iter().find(|w| w.name == "scheduler").cloned();
    let hb_cpu0 = sched.as_ref().and_then(|w| procfs::cpu_secs(w.pid));
    let hb_t0 = Instant::now();
    let mut hb_rss_max = 0u64;
    let hold = Duration::from_secs(args.hold_secs).min(run.remaining());
    while hb_t0.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(r) = sched.as_ref().and_then(|w| procfs::rss_kib(w.pid)) {
            hb_rss_max = hb_rss_max.max(r);
        }
    }
    let hb_secs = hb_t0.elapsed().as_secs_f64();
    let hb_cpu = match (
        hb_cpu0,
        sched.as_ref().and_then(|w| procfs::cpu_secs(w.pid)),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    if let Some(pid) = args.kill_scheduler {
        let agg = Arc::clone(&run.agg);
        let (extra, extra_rows) = crate::failover::drive(
            crate::failover::Plan {
                addrs,
                key: &key,
                argv: args.command.split_whitespace().map(str::to_owned).collect(),
                timeout_ms: args.task_timeout_ms,
                agents: online,
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
        let mut summary = serde_json::json!({
            "agents": open,
            "agents_online_at_scheduler": online,
        });
        if let (Some(s), Some(e)) = (summary.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let mut rows = vec![Row::new(
            "agents connected / online at scheduler",
            format!("{open} / {online}"),
        )];
        rows.extend(extra_rows);
        proc_rows(run, &mut summary, &mut rows, 0);
        return Ok(Done::Ready(summary, rows));
    }
    if args.rollout || args.config_push {
        let (extra, extra_rows) = if args.rollout {
            crate::rollout::drive(crate::rollout::Plan {
                addr,
                key: &key,
                stages: &args.rollout_stages,
                batch: &args.rollout_batch,
                max_failure_percent: args.rollout_max_failure_percent,
                argv: args.command.split_whitespace().map(str::to_owned).collect(),
                scheduler_pid: sched.as_ref().map(|w| w.pid),
                deadline: Instant::now() + run.remaining(),
            })
            .await?
        } else {
            crate::configpush::drive(crate::configpush::Plan {
                addr,
                key: &key,
                agents: online,
                prefix: &run.prefix,
                single: args.config_single,
                scheduler_pid: sched.as_ref().map(|w| w.pid),
                deadline: Instant::now() + run.remaining(),
            })
            .await?
        };
        let hb_pct = hb_cpu.map(|c| 100.0 * c / hb_secs.max(1e-3));
        let mut summary = serde_json::json!({
            "agents": open,
            "agents_online_at_scheduler": online,
            "connect_secs": open_secs,
            "register_to_online_secs": registered_secs,
            "scheduler_cpu_pct_heartbeat": hb_pct,
            "scheduler_rss_kib_heartbeat_max": hb_rss_max,
        });
        if let (Some(s), Some(e)) = (summary.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let mut rows = vec![Row::new(
            "agents connected / online at scheduler",
            format!("{open} / {online} ({registered_secs:.1} s to all online)"),
        )];
        rows.extend(extra_rows);
        proc_rows(run, &mut summary, &mut rows, 0);
        return Ok(Done::Ready(summary, rows));
    }
    // The task.
    let task_cpu0 = sched.as_ref().and_then(|w| procfs::cpu_secs(w.pid));
    let argv: Vec<&str> = args.command.split_whitespace().collect();
    let req = serde_json::json!({
        "targets": {"labels": {"fleet": "loadtest"}},
        "spec": {"kind": "command", "argv": argv},
        "timeout_ms": args.task_timeout_ms,
    });
    let created = Instant::now();
    let resp = http::request(
        addr,
        reqwest::Method::POST,
        "/v1/tasks",
        &key,
        Some(&req),
        run.remaining().max(Duration::from_secs(1)),
    )
    .await?;
    let create_ms = created.elapsed().as_secs_f64() * 1000.0;
    if resp.status != 201 {
        return Err(format!(
            "create task: HTTP {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        )
        .into());
    }
    let j = resp.json();
    let task_id = j["task_id"].as_u64().ok_or("create task: no task_id")?;
    let dispatched = j["dispatched"].as_u64().unwrap_or(0);
    // Poll until every target is terminal.
    let mut stored = 0u64;
    let mut first_result_s: Option<f64> = None;
    let mut finished = false;
    let mut states = serde_json::Value::Null;
    let mut poll_errors = 0u64;
    while run.remaining() > Duration::ZERO {
        match http::request(
            addr,
            reqwest::Method::GET,
            "/v1/tasks?limit=5",
            &key,
            None,
            Duration::from_secs(30),
        )
        .await
        {
            Ok(r) => {
                let j = r.json();
                if let Some(t) = j["tasks"]
                    .as_array()
                    .and_then(|a| a.iter().find(|t| t["task_id"].as_u64() == Some(task_id)))
                {
                    states = t["states"].clone();
                    stored = ["succeeded", "failed", "timed_out", "cancelled"]
                        .iter()
                        .filter_map(|k| states[*k].as_u64())
                        .sum();
                    finished = t["finished"].as_bool().unwrap_or(false);
                }
            }
            Err(_) => poll_errors += 1,
        }
        if stored > 0 && first_result_s.is_none() {
            first_result_s = Some(created.elapsed().as_secs_f64());
        }
        {
            let t = run.t();
            run.agg().second(t).stored = Some(stored);
        }
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_stored_s = created.elapsed().as_secs_f64();
    // The workers report once a second: let their counters (tasks, results, acks) catch up.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) && run.agg().totals.result_acks < stored {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let task_cpu = match (
        task_cpu0,
        sched.as_ref().and_then(|w| procfs::cpu_secs(w.pid)),
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let sched_rss = sched.as_ref().and_then(|w| procfs::rss_kib(w.pid));
    let totals = run.agg().totals.clone();
    let hs = run.agg().hs.clone();
    let hb_pct = hb_cpu.map(|c| 100.0 * c / hb_secs.max(1e-3));
    let mut summary = serde_json::json!({
        "agents": open,
        "agents_online_at_scheduler": online,
        "connect_secs": open_secs,
        "handshake_p50_ms": hs.ms(50.0),
        "handshake_p99_ms": hs.ms(99.0),
        "connect_errors": totals.connect_errors,
        "register_to_online_secs": registered_secs,
        "heartbeat_window_secs": hb_secs,
        "scheduler_cpu_secs_heartbeat": hb_cpu,
        "scheduler_cpu_pct_heartbeat": hb_pct,
        "scheduler_rss_kib_heartbeat_max": hb_rss_max,
        "task_id": task_id,
        "task_create_ms": create_ms,
        "dispatched": dispatched,
        "tasks_received_by_agents": totals.tasks,
        "results_sent": totals.results,
        "results_acked": totals.result_acks,
        "results_stored": stored,
        "task_finished": finished,
        "task_states": states,
        "first_result_stored_secs": first_result_s,
        "all_results_stored_secs": if finished { Some(all_stored_s) } else { None },
        "scheduler_cpu_secs_task": task_cpu,
        "scheduler_rss_kib_end": sched_rss,
        "poll_errors": poll_errors,
    });
    let opt = |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.2}{unit}"));
    let mut rows = vec![
        Row::new(
            "agents connected / online at scheduler",
            format!("{open} / {online}"),
        ),
        Row::new(
            "connect time, handshake p50 / p99",
            format!(
                "{open_secs:.1} s, {:.1} / {:.1} ms",
                hs.ms(50.0),
                hs.ms(99.0)
            ),
        ),
        Row::new(
            "all connected -> all online",
            format!("{registered_secs:.1} s"),
        ),
        Row::new(
            "scheduler CPU while all heartbeat",
            format!(
                "{} over {hb_secs:.0} s ({} of one core)",
                opt(hb_cpu, " s"),
                opt(hb_pct, "%")
            ),
        ),
        Row::new(
            "scheduler RSS (heartbeat max, end)",
            format!(
                "{:.1} MiB, {}",
                hb_rss_max as f64 / 1024.0,
                opt(sched_rss.map(|r| r as f64 / 1024.0), " MiB")
            ),
        ),
        Row::new(
            "POST /v1/tasks (create + dispatch to all)",
            format!("{create_ms:.0} ms, {dispatched} dispatched"),
        ),
        Row::new(
            "agents: tasks received / results sent / results acked",
            format!(
                "{} / {} / {}",
                totals.tasks, totals.results, totals.result_acks
            ),
        ),
        Row::new("create -> first result stored", opt(first_result_s, " s")),
        Row::new(
            "create -> all results stored",
            if finished {
                format!("{all_stored_s:.2} s ({stored} stored)")
            } else {
                format!("NOT FINISHED after {all_stored_s:.1} s ({stored} stored)")
            },
        ),
        Row::new("scheduler CPU for the task", opt(task_cpu, " s")),
    ];
    proc_rows(run, &mut summary, &mut rows, 0);
    Ok(Done::Ready(summary, rows))
}
