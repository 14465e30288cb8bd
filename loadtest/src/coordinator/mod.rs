//! The parent of a multi-process run (`loadtest run`): splits the connections over worker
//! processes (itself, re-executed as `loadtest worker`), reads their per-second JSON lines
//! into one timeline, samples the watched server processes from `/proc`, shows a live
//! progress line, hands the run to its scenario's driver and the results to
//! [`crate::report`]. This module owns the arguments, the shared run state and the
//! sampling; each scenario owns its driver, summary and rows: [`storm`] (connect storm and
//! the recovery after a fault), [`broadcast`] (periodic pushes, receipts, churn) and
//! [`fleet`] (simulated agents, task fan-out and its variants).
//! Every run is bounded: connections and rate by its arguments, time by `--max-secs`
//! (workers get a hard deadline a little later and stop on their own).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::client::BoxError;
use crate::hist::Hist;
use crate::procfs;
use crate::report::{self, Row};
use crate::worker::{Role, WorkerLine, WorkerSpec};

mod broadcast;
mod fleet;
mod storm;

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
    /// Results and config acks agents sent again (unacknowledged too long, or replayed
    /// after a new register).
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
    fn new(workers: usize) -> Agg {
        Agg {
            open: vec![0; workers],
            opened: vec![false; workers],
            started_at_us: vec![0; workers],
            opened_at_us: vec![0; workers],
            last_seen: vec![false; workers],
            ..Agg::default()
        }
    }

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

impl Watched {
    /// Notes the process's RSS and CPU now, the baseline of its figures.
    fn new(name: String, pid: u32, gateway_index: Option<usize>) -> Watched {
        Watched {
            name,
            pid,
            gateway_index,
            base_rss: procfs::rss_kib(pid),
            base_cpu: procfs::cpu_secs(pid),
        }
    }
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

    /// The per-second record with each second's percentiles filled in, for the report.
    fn timeline(&self) -> Vec<Second> {
        let mut seconds = self.agg().seconds.clone();
        for s in &mut seconds {
            s.hs_p50_ms = s.hs.ms(50.0);
            s.hs_p99_ms = s.hs.ms(99.0);
            s.lat_p50_ms = s.lat.ms(50.0);
            s.lat_p99_ms = s.lat.ms(99.0);
            s.lat_max_ms = s.lat.ms(100.0);
        }
        seconds
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
    let watched = watched(&args)?;
    let agg = Arc::new(Mutex::new(Agg::new(workers)));
    let run = Arc::new(Run {
        args: args.clone(),
        urls: common.urls.clone(),
        connections: common.connections,
        agg,
        started: Instant::now(),
        watched,
        prefix: common.user_prefix.clone(),
    });
    let workers = Workers::spawn(&run, &common, workers)?;
    let (stop_sampler, sampler_stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample(Arc::clone(&run), sampler_stopped));
    let driven = match args.scenario {
        Kind::Storm => storm::storm(&run).await,
        Kind::Broadcast => broadcast::broadcast(&run).await,
        Kind::Fleet => fleet::fleet(&run).await,
    };
    workers.stop().await;
    let _ = stop_sampler.send(true);
    let _ = sampler.await;
    eprintln!();
    let (summary, rows) = match driven? {
        Done::Ready(summary, rows) => (summary, rows),
        Done::Broadcast(b) => broadcast::summary(&run, *b),
    };
    let run = Arc::try_unwrap(run).map_err(|_| "run still shared")?;
    finish(&run, summary, rows)
}

/// The processes `--gateway-pids` and `--watch` name, with their RSS and CPU now.
fn watched(args: &RunArgs) -> Result<Vec<Watched>, BoxError> {
    let mut watched = Vec::new();
    for (i, entry) in args.gateway_pids.iter().enumerate() {
        let (name, pid) = match entry.split_once('=') {
            Some((n, p)) => (n.to_owned(), p),
            None => (format!("gw{}", i + 1), entry.as_str()),
        };
        let pid: u32 = pid
            .parse()
            .map_err(|_| format!("--gateway-pids {entry}: bad pid"))?;
        watched.push(Watched::new(name, pid, Some(i)));
    }
    for w in &args.watch {
        let Some((name, pid)) = w.split_once('=') else {
            return Err(format!("--watch {w}: use name=pid").into());
        };
        let pid: u32 = pid.parse().map_err(|_| format!("--watch {w}: bad pid"))?;
        watched.push(Watched::new(name.to_owned(), pid, None));
    }
    Ok(watched)
}

/// The worker processes (this binary re-executed as `loadtest worker`) and the tasks
/// reading their per-second lines into the run's [`Agg`].
struct Workers {
    children: Vec<(Child, Option<ChildStdin>)>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Splits the connections over `workers` processes and starts them.
    fn spawn(run: &Arc<Run>, common: &Common, workers: usize) -> Result<Workers, BoxError> {
        let args = &run.args;
        let fail_from_task = match &args.agent_fail_after_stage {
            Some(stage) => crate::rollout::fail_from_task(
                &args.rollout_stages,
                &args.rollout_batch,
                common.connections as u64,
                stage,
            )
            .ok_or_else(|| {
                format!("--agent-fail-after-stage {stage}: not one of --rollout-stages")
            })?,
            None => 0,
        };
        let exe = std::env::current_exe()?;
        let per = common.connections / workers;
        let extra = common.connections % workers;
        let mut out = Workers {
            children: Vec::new(),
            readers: Vec::new(),
        };
        let mut first = 0usize;
        for w in 0..workers {
            let count = per + usize::from(w < extra);
            let spec = worker_spec(args, common, workers, w, first, count, fail_from_task);
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
            out.children.push((child, stdin));
            out.readers
                .push(tokio::spawn(read_lines(Arc::clone(run), w, stdout)));
        }
        Ok(out)
    }

    /// Tells every worker to stop, collects their last lines, reaps them.
    async fn stop(self) {
        let Workers {
            mut children,
            readers,
        } = self;
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
    }
}

/// Worker `w`'s share: connections `first..first + count` and its part of the rate.
fn worker_spec(
    args: &RunArgs,
    common: &Common,
    workers: usize,
    w: usize,
    first: usize,
    count: usize,
    fail_from_task: u64,
) -> WorkerSpec {
    let role = if args.scenario == Kind::Fleet {
        Role::Agent
    } else if args.peer_nats_ws {
        Role::NatsWs
    } else {
        Role::Client
    };
    WorkerSpec {
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
    }
}

/// Reads worker `w`'s JSON lines into the run's aggregate until it closes its stdout.
async fn read_lines(run: Arc<Run>, w: usize, stdout: tokio::process::ChildStdout) {
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
}

/// The run's common summary keys, the memory trend, the thresholds; prints the table and
/// writes the report. Returns whether every threshold held.
fn finish(run: &Run, mut summary: serde_json::Value, mut rows: Vec<Row>) -> Result<bool, BoxError> {
    let args = &run.args;
    let timeline = run.timeline();
    summary["name"] = args.name.clone().into();
    summary["scenario"] = serde_json::to_value(args.scenario)?;
    summary["connections_target"] = run.connections.into();
    summary["workers"] = args.workers.max(1).into();
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
        crate::trend::add(&timeline, warmup, &gateways, &mut summary, &mut rows);
    }
    let ok = report::apply_thresholds(args.thresholds.as_deref(), &mut summary, &mut rows)?;
    report::print_table(&args.name, &rows);
    let files = report::write(&args.out, &args.name, &summary, &rows, &timeline)?;
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
    Broadcast(Box<broadcast::BroadcastDone>),
}

type Driven = Result<Done, BoxError>;
