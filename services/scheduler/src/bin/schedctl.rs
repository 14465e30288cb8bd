//! `schedctl`: the operator's terminal view of the fleet. It talks to the scheduler's HTTP
//! API (the same one automation uses), prints readable tables, and `--json` prints the API's
//! JSON unchanged for scripts.
//!
//! ```text
//! schedctl agents --label region=eu
//! schedctl run --label region=eu --wait -- uname -a
//! schedctl run --nodes edge-1 --follow -- sh -c 'for i in 1 2 3; do echo $i; sleep 1; done'
//! schedctl probe tcp 10.0.0.1:443 --nodes edge-1,edge-2 --wait
//! schedctl task 42
//! schedctl audit --since 120
//! schedctl config set app.conf --file app.conf --selector region=eu --validate 'sh -n {file}'
//! schedctl config status app.conf
//! schedctl config rollback app.conf --to 1
//! schedctl config set app.conf --file app.conf --selector region=eu --stage
//! schedctl rollout start --selector region=eu --config app.conf --version 3 --batch 10%
//! schedctl rollout start --selector role=edge --batch 10% --pause-secs 30 -- /opt/upgrade.sh
//! schedctl rollout status 3
//! schedctl rollout promote 3
//! schedctl artifact upload ./agent-1.4.0
//! schedctl upgrade start --sha256 <sha256> --version 1.4.0 --selector region=eu --deadline-secs 120
//! schedctl upgrade status 1
//! schedctl tunnel edge-1 --remote 127.0.0.1:22 --local 127.0.0.1:2222
//! ```
//! The key (`SCHEDULER_API_KEY`) is one secret of the scheduler's `SCHEDULER_API_KEYS`: a
//! read-scope key can list and show, creating and cancelling need an operator key.
//! `--url` takes `http://` or `https://`. Over HTTPS the scheduler's certificate must chain
//! to the system's trust store, or to the CAs in the PEM file given with `--cacert`
//! (`SCHEDULER_CACERT`), which then replace the system store. The client is reqwest with
//! rustls (servicekit::tls); a certificate problem is reported as such (exit 69).
//!
//! Exit codes: 0 success, 1 the API refused the request, 2 a task finished with failures
//! (with `--wait`), 64 bad usage (including an unreadable `--cacert`), 69 the scheduler is
//! unreachable or its certificate is not trusted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use servicekit::http_client::ClientOptions;

#[derive(Debug, Parser)]
#[command(
    name = "schedctl",
    version,
    about = "Operate the fleet through the scheduler's API"
)]
struct Cli {
    /// Scheduler base URL.
    #[arg(long, env = "SCHEDULER_URL", default_value = "http://127.0.0.1:8100")]
    url: String,
    /// API key.
    #[arg(long, env = "SCHEDULER_API_KEY", hide_env_values = true)]
    key: String,
    /// PEM file of the CAs to trust for an https:// URL, instead of the system's store.
    #[arg(long, env = "SCHEDULER_CACERT")]
    cacert: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List agents.
    Agents {
        /// Only agents with this label (`key=value`, repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Only agents in this state (online, degraded, offline).
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one agent.
    Agent {
        /// Node id.
        id: String,
    },
    /// Revoke a node: disconnected everywhere and refused until enrolled again
    /// (`--lift` lifts the revocation).
    Revoke {
        /// Node id.
        id: String,
        /// Lift the revocation instead.
        #[arg(long)]
        lift: bool,
    },
    /// Print an enrolment token for a node (put it in the agent's `token_file`).
    Enrol {
        /// Node id.
        id: String,
        /// Token lifetime, seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Pin labels on a node (`key=value`, repeatable; none unpins all): pinned labels
    /// override what the agent reports.
    Pin {
        /// Node id.
        id: String,
        /// Labels to pin.
        labels: Vec<String>,
    },
    /// Run a command on agents: `schedctl run --label role=edge -- df -h`.
    Run {
        #[command(flatten)]
        target: Target,
        /// Program and arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Probe a target from agents.
    Probe {
        /// `tcp` (host:port) or `http` (URL).
        kind: String,
        /// What to probe.
        what: String,
        #[command(flatten)]
        target: Target,
    },
    /// List tasks.
    Tasks {
        /// How many, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show a task with per-agent states and results.
    Task {
        /// Task id.
        id: u64,
    },
    /// Forward a local TCP port to a port on an agent's machine: every connection accepted
    /// on `--local` becomes one tunnel stream to `--remote` (which the agent's
    /// `tunnel_allow` must name). Runs until interrupted; needs an operator key.
    Tunnel {
        /// The agent's node id.
        node: String,
        /// `host:port` to reach from the agent's machine.
        #[arg(long)]
        remote: String,
        /// Local address to listen on (port 0: any free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        local: String,
    },
    /// Cancel a task everywhere it has not finished.
    Cancel {
        /// Task id.
        id: u64,
    },
    /// Versioned config documents: set, get, history, status, rollback.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Recurring tasks from cron expressions (UTC): create, list, get, delete, pause, resume.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Staged rollouts of a command or an agent upgrade: start, list, status, promote, pause,
    /// resume, abort.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Agent binaries for upgrades: upload, list.
    Artifact {
        #[command(subcommand)]
        command: ArtifactCommand,
    },
    /// Signed agent upgrades: start, status, list.
    Upgrade {
        #[command(subcommand)]
        command: UpgradeCommand,
    },
    /// Show the audit log: who created, cancelled or revoked what, oldest first.
    Audit {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// How many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Store the next version of a document from a file, make it desired and push it.
    Set {
        /// Document name: the file name agents write in their config_dir.
        name: String,
        /// The file with the new content (UTF-8 text).
        #[arg(long)]
        file: PathBuf,
        /// Target these node ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Target agents with these labels (`k=v`, comma-separated or repeated); agents that
        /// register later with matching labels get it too.
        #[arg(long = "selector", alias = "label")]
        selectors: Vec<String>,
        /// Command the agent runs against the new file before using it, split at white
        /// space; `{file}` stands for the file. Must be on the agents' allowlist.
        #[arg(long)]
        validate: Option<String>,
        /// Command the agent runs after the file was replaced (same rules).
        #[arg(long)]
        reload: Option<String>,
        /// Only store the version (push nothing): roll it out in stages with
        /// `schedctl rollout start --config NAME --version N`.
        #[arg(long)]
        stage: bool,
    },
    /// Print a document's desired version (or `--version N`) to stdout.
    Get {
        /// Document name.
        name: String,
        /// This version instead of the desired one.
        #[arg(long)]
        version: Option<u64>,
    },
    /// List the kept versions of a document.
    History {
        /// Document name.
        name: String,
    },
    /// Which nodes run which version: applied, pending, or failed with the error.
    Status {
        /// Document name.
        name: String,
    },
    /// Make an older kept version desired again and push it.
    Rollback {
        /// Document name.
        name: String,
        /// The version to go back to.
        #[arg(long)]
        to: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ArtifactCommand {
    /// Upload an agent binary; prints its sha256 (what `upgrade start` names).
    Upload {
        /// The binary.
        file: PathBuf,
    },
    /// List uploaded artifacts.
    List,
}

#[derive(Debug, Subcommand)]
enum UpgradeCommand {
    /// Upgrade agents to an uploaded artifact; prints the upgrade id.
    Start {
        /// The artifact's sha256 (from `artifact upload`).
        #[arg(long)]
        sha256: String,
        /// The version the new binary reports once running.
        #[arg(long)]
        version: String,
        /// Target these node ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Target agents with these labels (`k=v`, comma-separated or repeated).
        #[arg(long = "selector", alias = "label")]
        selectors: Vec<String>,
        /// How long each agent's new binary gets to come back online before its watchdog
        /// restores the previous one, seconds.
        #[arg(long, default_value_t = 120)]
        deadline_secs: u64,
        /// Only for agents on this OS (`linux`).
        #[arg(long)]
        os: Option<String>,
        /// Only for agents on this CPU architecture (`x86_64`, `aarch64`).
        #[arg(long)]
        arch: Option<String>,
    },
    /// Per node: pending, downloading, installed, online, rolled_back or failed (why).
    Status {
        /// Upgrade id.
        id: u64,
    },
    /// List recent upgrades.
    List,
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Create a schedule: `schedctl schedule create --cron '*/5 * * * *' --nodes a,b -- uptime`.
    Create {
        /// Cron expression, UTC: minute hour day-of-month month day-of-week, or with a
        /// leading seconds field.
        #[arg(long)]
        cron: String,
        /// Target these node ids (comma-separated), resolved at each fire.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Target agents with these labels (`k=v`, comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        selector: Vec<String>,
        /// When a period is due while the previous run is unfinished: skip it, or allow it.
        #[arg(long, default_value = "skip")]
        overlap: String,
        /// Per-attempt timeout, ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Program and arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// List schedules.
    List,
    /// Show one schedule.
    Get {
        /// Schedule id.
        id: u64,
    },
    /// Delete a schedule (the tasks it created stay).
    Delete {
        /// Schedule id.
        id: u64,
    },
    /// Pause a schedule.
    Pause {
        /// Schedule id.
        id: u64,
    },
    /// Resume a paused schedule (periods missed while paused are not fired).
    Resume {
        /// Schedule id.
        id: u64,
    },
}

// Parsed once per run; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Start a rollout: `schedctl rollout start --selector role=edge --stages pilot=1%,gray=20%,full=100% --batch 10% -- /opt/upgrade.sh`.
    Start {
        /// Target these node ids (comma-separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Target agents with these labels (`k=v`, comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        selector: Vec<String>,
        /// Cumulative stages, `name=size` comma-separated, a size being a count or a
        /// percentage of the targets [default: pilot=1%,gray=20%,full=100%].
        #[arg(long, value_delimiter = ',')]
        stages: Vec<String>,
        /// Nodes per batch within a stage: a count or a percentage of the stage
        /// [default: the whole stage].
        #[arg(long)]
        batch: Option<String>,
        /// Seconds between batches.
        #[arg(long, default_value_t = 0)]
        pause_secs: u64,
        /// Failures a stage tolerates, percent of its nodes; one more halts the rollout.
        #[arg(long, default_value_t = 5)]
        max_failure_percent: u8,
        /// Seconds a batch may take; targets not finished by then count as failed.
        #[arg(long)]
        batch_timeout_secs: Option<u64>,
        /// Go on to the next stage without `promote`.
        #[arg(long)]
        auto_promote: bool,
        /// Per-attempt timeout, ms (command rollouts).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Roll out an agent upgrade of this uploaded artifact (`schedctl artifact upload`)
        /// instead of a command.
        #[arg(
            long,
            value_name = "SHA256",
            requires = "version",
            conflicts_with = "config"
        )]
        upgrade: Option<String>,
        /// Roll out a version of this config document (`--version N`, usually staged with
        /// `schedctl config set --stage`) instead of a command.
        #[arg(long, value_name = "NAME", requires = "version")]
        config: Option<String>,
        /// The version the new agent binary reports (with `--upgrade`), or the config
        /// version (with `--config`).
        #[arg(long)]
        version: Option<String>,
        /// Seconds each agent's new binary gets to come online (with `--upgrade`).
        #[arg(long)]
        deadline_secs: Option<u64>,
        /// Program and arguments (a command rollout).
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// List rollouts.
    List,
    /// Show a rollout: its stages with progress, the batch in flight, why it halted.
    Status {
        /// Rollout id.
        id: u64,
    },
    /// Start the next stage of a rollout waiting for promotion.
    Promote {
        /// Rollout id.
        id: u64,
    },
    /// Pause: the batch in flight finishes, no new one starts.
    Pause {
        /// Rollout id.
        id: u64,
    },
    /// Resume a paused or halted rollout (a halted stage's failures so far are accepted).
    Resume {
        /// Rollout id.
        id: u64,
    },
    /// Abort: cancel the batch in flight and stop for good.
    Abort {
        /// Rollout id.
        id: u64,
    },
}

#[derive(Debug, Args)]
struct Target {
    /// Target these node ids (comma-separated).
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<String>,
    /// Target agents with this label (`key=value`, repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Per-attempt timeout, ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Wait for every target to finish and print the results.
    #[arg(long)]
    wait: bool,
    /// Print each target's output as it is produced (lines prefixed by node; the
    /// command's stderr goes to stderr), then each target's outcome; exits like `--wait`.
    #[arg(long, conflicts_with = "wait")]
    follow: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
}

/// Why a command failed, with its exit code.
#[derive(Debug)]
enum Failure {
    Usage(String),
    Unreachable(String),
    Api(u16, String),
    TasksFailed,
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 64,
            Failure::Unreachable(_) => 69,
            Failure::Api(..) => 1,
            Failure::TasksFailed => 2,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            match &f {
                Failure::Usage(m) => eprintln!("schedctl: {m}"),
                Failure::Unreachable(m) => eprintln!("schedctl: scheduler unreachable: {m}"),
                Failure::Api(status, m) => eprintln!("schedctl: {status}: {m}"),
                Failure::TasksFailed => eprintln!("schedctl: some targets did not succeed"),
            }
            ExitCode::from(f.code())
        }
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    let api = Api::new(&cli.url, &cli.key, cli.cacert.as_deref())?;
    match &cli.command {
        Command::Agents { labels, state } => {
            let mut query: Vec<String> = labels.iter().map(|l| format!("label={l}")).collect();
            if let Some(s) = state {
                query.push(format!("state={s}"));
            }
            let path = if query.is_empty() {
                "/v1/agents".to_owned()
            } else {
                format!("/v1/agents?{}", query.join("&"))
            };
            let v = api.get(&path)?;
            if cli.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["agents"]
                .as_array()
                .map(|a| a.iter().map(agent_row).collect())
                .unwrap_or_default();
            print_table(
                &["NODE", "STATE", "LABELS", "VERSION", "HOST", "LAST SEEN"],
                &rows,
            );
            Ok(())
        }
        Command::Agent { id } => {
            let v = api.get(&format!("/v1/agents/{id}"))?;
            if cli.json {
                return print_json(&v);
            }
            print_table(
                &["NODE", "STATE", "LABELS", "VERSION", "HOST", "LAST SEEN"],
                &[agent_row(&v)],
            );
            Ok(())
        }
        Command::Run { target, argv } => {
            let spec = json!({"kind": "command", "argv": argv});
            create(&api, cli.json, target, &spec)
        }
        Command::Probe { kind, what, target } => {
            let spec = match kind.as_str() {
                "tcp" => json!({"kind": "tcp_probe", "target": what}),
                "http" => json!({"kind": "http_probe", "url": what}),
                other => {
                    return Err(Failure::Usage(format!(
                        "probe kind {other:?}: use tcp or http"
                    )));
                }
            };
            create(&api, cli.json, target, &spec)
        }
        Command::Tasks { limit } => {
            let v = api.get(&format!("/v1/tasks?limit={limit}"))?;
            if cli.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["tasks"]
                .as_array()
                .map(|tasks| {
                    tasks
                        .iter()
                        .map(|t| {
                            vec![
                                text(&t["task_id"]),
                                text(&t["spec"]["spec"]["kind"]),
                                summary_of_states(&t["targets"]),
                                if t["finished"] == Value::Bool(true) {
                                    "yes".into()
                                } else {
                                    "no".into()
                                },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(&["TASK", "KIND", "TARGETS", "FINISHED"], &rows);
            Ok(())
        }
        Command::Task { id } => {
            let v = api.get(&format!("/v1/tasks/{id}"))?;
            if cli.json {
                return print_json(&v);
            }
            print_task(&v);
            Ok(())
        }
        Command::Revoke { id, lift } => {
            let path = format!("/v1/agents/{id}/revoke");
            let v = if *lift {
                api.request(reqwest::Method::DELETE, &path, None)?
            } else {
                api.post(&path, &json!({}))?
            };
            if cli.json {
                return print_json(&v);
            }
            println!("{id}: revoked={}", text(&v["revoked"]));
            Ok(())
        }
        Command::Enrol { id, ttl_secs } => {
            let v = api.post(
                &format!("/v1/agents/{id}/token"),
                &json!({"ttl_secs": ttl_secs}),
            )?;
            if cli.json {
                return print_json(&v);
            }
            // Only the token on stdout, so it can be redirected into a file.
            println!("{}", text(&v["token"]));
            Ok(())
        }
        Command::Pin { id, labels } => {
            let mut pinned = serde_json::Map::new();
            for label in labels {
                let Some((k, v)) = label.split_once('=') else {
                    return Err(Failure::Usage(format!("label {label:?}: use key=value")));
                };
                pinned.insert(k.to_owned(), json!(v));
            }
            let v = api.request(
                reqwest::Method::PUT,
                &format!("/v1/agents/{id}/labels"),
                Some(&json!({"labels": pinned})),
            )?;
            if cli.json {
                return print_json(&v);
            }
            println!("{id}: pinned {}", v["pinned"]);
            Ok(())
        }
        Command::Tunnel {
            node,
            remote,
            local,
        } => tunnel::serve(cli, node, remote, local),
        Command::Cancel { id } => {
            let v = api.post(&format!("/v1/tasks/{id}/cancel"), &json!({}))?;
            if cli.json {
                return print_json(&v);
            }
            println!("cancelled on: {}", text(&v["cancelled"]));
            Ok(())
        }
        Command::Config { command } => config(&api, cli.json, command),
        Command::Schedule { command } => schedule(&api, cli.json, command),
        Command::Rollout { command } => rollout(&api, cli.json, command),
        Command::Artifact { command } => artifact(&api, cli.json, command),
        Command::Upgrade { command } => upgrade(&api, cli.json, command),
        Command::Audit { since, limit } => {
            let v = api.get(&format!("/v1/audit?since={since}&limit={limit}"))?;
            if cli.json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["entries"]
                .as_array()
                .map(|entries| {
                    entries
                        .iter()
                        .map(|e| {
                            vec![
                                text(&e["seq"]),
                                e["at_ms"].as_u64().map(ago).unwrap_or_default(),
                                text(&e["actor"]),
                                text(&e["action"]),
                                text(&e["target"]),
                                audit_detail(&e["detail"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(
                &["SEQ", "WHEN", "ACTOR", "ACTION", "TARGET", "DETAIL"],
                &rows,
            );
            Ok(())
        }
    }
}

/// `k=v` pairs (each argument may hold several, comma-separated) as a JSON object.
fn label_map(args: &[String]) -> Result<serde_json::Map<String, Value>, Failure> {
    let mut labels = serde_json::Map::new();
    for pair in args
        .iter()
        .flat_map(|a| a.split(','))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| Failure::Usage(format!("selector {pair:?}: use key=value")))?;
        labels.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(labels)
}

fn artifact(api: &Api, as_json: bool, command: &ArtifactCommand) -> Result<(), Failure> {
    match command {
        ArtifactCommand::Upload { file } => {
            let bytes = std::fs::read(file)
                .map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
            let v = api.post_bytes("/v1/artifacts", bytes)?;
            if as_json {
                return print_json(&v);
            }
            println!("{}", text(&v["sha256"]));
            eprintln!("artifact {} bytes", text(&v["size"]));
            Ok(())
        }
        ArtifactCommand::List => {
            let v = api.get("/v1/artifacts")?;
            if as_json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["artifacts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|a| {
                            vec![
                                text(&a["sha256"]),
                                text(&a["size"]),
                                a["uploaded_at_ms"].as_u64().map(ago).unwrap_or_default(),
                                text(&a["actor"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(&["SHA256", "SIZE", "UPLOADED", "BY"], &rows);
            Ok(())
        }
    }
}

fn upgrade(api: &Api, as_json: bool, command: &UpgradeCommand) -> Result<(), Failure> {
    match command {
        UpgradeCommand::Start {
            sha256,
            version,
            nodes,
            selectors,
            deadline_secs,
            os,
            arch,
        } => {
            let targets = match (nodes.is_empty(), selectors.is_empty()) {
                (false, true) => json!({"nodes": nodes}),
                (true, false) => json!({"labels": label_map(selectors)?}),
                _ => return Err(Failure::Usage("give either --nodes or --selector".into())),
            };
            let mut body = json!({
                "targets": targets,
                "sha256": sha256,
                "version": version,
                "deadline_secs": deadline_secs,
            });
            if let Some(os) = os {
                body["os"] = json!(os);
            }
            if let Some(arch) = arch {
                body["arch"] = json!(arch);
            }
            let v = api.post("/v1/upgrades", &body)?;
            if as_json {
                return print_json(&v);
            }
            println!("{}", text(&v["upgrade_id"]));
            eprintln!(
                "upgrade to {version} for {} node(s), pushed to {} now",
                v["nodes"].as_array().map_or(0, Vec::len),
                text(&v["pushed"])
            );
            Ok(())
        }
        UpgradeCommand::Status { id } => {
            let v = api.get(&format!("/v1/upgrades/{id}"))?;
            if as_json {
                return print_json(&v);
            }
            println!(
                "upgrade {id} to {} (sha256 {}), deadline {} s",
                text(&v["version"]),
                short_sha(&v["sha256"]),
                v["deadline_ms"].as_u64().unwrap_or(0) / 1000
            );
            let rows: Vec<Vec<String>> = v["nodes"]
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .map(|n| {
                            let mut state = text(&n["state"]);
                            if n["overdue"] == json!(true) {
                                state.push_str(" (overdue)");
                            }
                            vec![
                                text(&n["node_id"]),
                                state,
                                text(&n["running_version"]),
                                n["updated_at_ms"].as_u64().map(ago).unwrap_or_default(),
                                text(&n["error"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(&["NODE", "STATE", "RUNNING", "UPDATED", "ERROR"], &rows);
            Ok(())
        }
        UpgradeCommand::List => {
            let v = api.get("/v1/upgrades")?;
            if as_json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["upgrades"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|u| {
                            vec![
                                text(&u["upgrade_id"]),
                                text(&u["version"]),
                                short_sha(&u["sha256"]),
                                u["created_at_ms"].as_u64().map(ago).unwrap_or_default(),
                                text(&u["actor"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(&["ID", "VERSION", "SHA256", "CREATED", "BY"], &rows);
            Ok(())
        }
    }
}

fn config(api: &Api, as_json: bool, command: &ConfigCommand) -> Result<(), Failure> {
    match command {
        ConfigCommand::Set {
            name,
            file,
            nodes,
            selectors,
            validate,
            reload,
            stage,
        } => {
            let targets = match (nodes.is_empty(), selectors.is_empty()) {
                (false, true) => json!({"nodes": nodes}),
                (true, false) => json!({"labels": label_map(selectors)?}),
                _ => return Err(Failure::Usage("give either --nodes or --selector".into())),
            };
            let content = std::fs::read_to_string(file)
                .map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
            let argv = |s: &Option<String>| {
                s.as_ref()
                    .map(|s| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            };
            let mut body = json!({"content": content, "targets": targets});
            if let Some(v) = argv(validate) {
                body["validate"] = json!(v);
            }
            if let Some(r) = argv(reload) {
                body["reload"] = json!(r);
            }
            if *stage {
                body["activate"] = json!(false);
            }
            let v = api.post(&format!("/v1/configs/{name}"), &body)?;
            if as_json {
                return print_json(&v);
            }
            if *stage {
                println!(
                    "config {name} version {} (sha256 {}) staged for {} node(s); roll it out with: schedctl rollout start --config {name} --version {}",
                    text(&v["version"]),
                    short_sha(&v["sha256"]),
                    v["nodes"].as_array().map_or(0, Vec::len),
                    text(&v["version"]),
                );
                return Ok(());
            }
            println!(
                "config {name} version {} (sha256 {}) for {} node(s), pushed to {} now",
                text(&v["version"]),
                short_sha(&v["sha256"]),
                v["nodes"].as_array().map_or(0, Vec::len),
                text(&v["pushed"])
            );
            Ok(())
        }
        ConfigCommand::Get { name, version } => {
            let path = match version {
                Some(n) => format!("/v1/configs/{name}?version={n}"),
                None => format!("/v1/configs/{name}"),
            };
            let v = api.get(&path)?;
            if as_json {
                return print_json(&v);
            }
            // Only the content on stdout, so it can be redirected into a file.
            print!("{}", v["content"].as_str().unwrap_or_default());
            eprintln!(
                "config {name} version {} (sha256 {}){}",
                text(&v["version"]),
                short_sha(&v["sha256"]),
                if v["desired"] == Value::Bool(true) {
                    ", desired"
                } else {
                    ""
                }
            );
            Ok(())
        }
        ConfigCommand::History { name } => {
            let v = api.get(&format!("/v1/configs/{name}/history"))?;
            if as_json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["versions"]
                .as_array()
                .map(|versions| {
                    versions
                        .iter()
                        .map(|x| {
                            vec![
                                text(&x["version"]),
                                short_sha(&x["sha256"]),
                                text(&x["size"]),
                                x["created_at_ms"].as_u64().map(ago).unwrap_or_default(),
                                text(&x["actor"]),
                                if x["desired"] == Value::Bool(true) {
                                    "*".into()
                                } else {
                                    String::new()
                                },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(
                &["VERSION", "SHA256", "BYTES", "CREATED", "BY", "DESIRED"],
                &rows,
            );
            Ok(())
        }
        ConfigCommand::Status { name } => {
            let v = api.get(&format!("/v1/configs/{name}/status"))?;
            if as_json {
                return print_json(&v);
            }
            println!(
                "config {name}: desired version {} (sha256 {}); {} applied, {} pending, {} failed",
                text(&v["desired_version"]),
                short_sha(&v["sha256"]),
                text(&v["counts"]["applied"]),
                text(&v["counts"]["pending"]),
                text(&v["counts"]["failed"])
            );
            let rows: Vec<Vec<String>> = v["nodes"]
                .as_array()
                .map(|nodes| {
                    nodes
                        .iter()
                        .map(|n| {
                            vec![
                                text(&n["node_id"]),
                                text(&n["state"]),
                                text(&n["desired_version"]),
                                text(&n["applied_version"]),
                                text(&n["agent_state"]),
                                text(&n["error"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print_table(&["NODE", "STATE", "WANTS", "RUNS", "AGENT", "ERROR"], &rows);
            Ok(())
        }
        ConfigCommand::Rollback { name, to } => {
            let v = api.post(&format!("/v1/configs/{name}/rollback"), &json!({"to": to}))?;
            if as_json {
                return print_json(&v);
            }
            println!(
                "config {name} desired version is now {} (sha256 {}), pushed to {} node(s) now",
                text(&v["version"]),
                short_sha(&v["sha256"]),
                text(&v["pushed"])
            );
            Ok(())
        }
    }
}

/// The first 12 hex digits of a SHA-256, enough to tell versions apart in a table.
fn short_sha(v: &Value) -> String {
    text(v).chars().take(12).collect()
}

fn schedule(api: &Api, as_json: bool, command: &ScheduleCommand) -> Result<(), Failure> {
    let v = match command {
        ScheduleCommand::Create {
            cron,
            nodes,
            selector,
            overlap,
            timeout_ms,
            argv,
        } => {
            let targets = match (nodes.is_empty(), selector.is_empty()) {
                (false, true) => json!({"nodes": nodes}),
                (true, false) => json!({"labels": label_map(selector)?}),
                _ => return Err(Failure::Usage("give either --nodes or --selector".into())),
            };
            let mut body = json!({
                "cron": cron,
                "overlap": overlap,
                "targets": targets,
                "spec": {"kind": "command", "argv": argv},
            });
            if let Some(t) = timeout_ms {
                body["timeout_ms"] = json!(t);
            }
            api.post("/v1/schedules", &body)?
        }
        ScheduleCommand::List => {
            let v = api.get("/v1/schedules")?;
            if as_json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["schedules"]
                .as_array()
                .map(|a| a.iter().map(schedule_row).collect())
                .unwrap_or_default();
            print_table(SCHEDULE_HEADERS, &rows);
            return Ok(());
        }
        ScheduleCommand::Get { id } => api.get(&format!("/v1/schedules/{id}"))?,
        ScheduleCommand::Delete { id } => {
            let v = api.request(
                reqwest::Method::DELETE,
                &format!("/v1/schedules/{id}"),
                None,
            )?;
            if as_json {
                return print_json(&v);
            }
            println!("schedule {id} deleted");
            return Ok(());
        }
        ScheduleCommand::Pause { id } => {
            api.post(&format!("/v1/schedules/{id}/pause"), &json!({}))?
        }
        ScheduleCommand::Resume { id } => {
            api.post(&format!("/v1/schedules/{id}/resume"), &json!({}))?
        }
    };
    if as_json {
        return print_json(&v);
    }
    print_table(SCHEDULE_HEADERS, &[schedule_row(&v)]);
    if let Some(e) = v["last_error"].as_str() {
        println!("last error: {e}");
    }
    Ok(())
}

fn rollout(api: &Api, as_json: bool, command: &RolloutCommand) -> Result<(), Failure> {
    let v = match command {
        RolloutCommand::Start {
            nodes,
            selector,
            stages,
            batch,
            pause_secs,
            max_failure_percent,
            batch_timeout_secs,
            auto_promote,
            timeout_ms,
            upgrade,
            config,
            version,
            deadline_secs,
            argv,
        } => {
            let targets = match (nodes.is_empty(), selector.is_empty()) {
                (false, true) => json!({"nodes": nodes}),
                (true, false) => json!({"labels": label_map(selector)?}),
                _ => return Err(Failure::Usage("give either --nodes or --selector".into())),
            };
            let mut body = json!({
                "targets": targets,
                "pause_ms": pause_secs.saturating_mul(1000),
                "max_failure_percent": max_failure_percent,
                "auto_promote": auto_promote,
            });
            if !stages.is_empty() {
                let mut list = Vec::new();
                for s in stages {
                    let Some((name, size)) = s.split_once('=') else {
                        return Err(Failure::Usage(format!(
                            "stage {s:?}: write name=size, e.g. pilot=1% or gray=200"
                        )));
                    };
                    list.push(json!({"name": name, "size": size}));
                }
                body["stages"] = json!(list);
            }
            if let Some(b) = batch {
                body["batch"] = json!(b);
            }
            if let Some(t) = batch_timeout_secs {
                body["batch_timeout_ms"] = json!(t.saturating_mul(1000));
            }
            match (upgrade, argv.is_empty()) {
                (None, true) if config.is_some() => {
                    let number = version
                        .as_deref()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| {
                            Failure::Usage("--config needs --version N (a version number)".into())
                        })?;
                    body["config"] = json!({"name": config, "version": number});
                }
                (Some(sha256), true) => {
                    let mut u = json!({"sha256": sha256, "version": version});
                    if let Some(d) = deadline_secs {
                        u["deadline_secs"] = json!(d);
                    }
                    body["upgrade"] = u;
                }
                (None, false) => {
                    body["spec"] = json!({"kind": "command", "argv": argv});
                    if let Some(t) = timeout_ms {
                        body["timeout_ms"] = json!(t);
                    }
                }
                _ => {
                    return Err(Failure::Usage(
                        "give one of -- COMMAND..., --upgrade SHA256 --version V or --config NAME --version N".into(),
                    ));
                }
            }
            api.post("/v1/rollouts", &body)?
        }
        RolloutCommand::List => {
            let v = api.get("/v1/rollouts")?;
            if as_json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["rollouts"]
                .as_array()
                .map(|a| a.iter().map(rollout_row).collect())
                .unwrap_or_default();
            print_table(ROLLOUT_HEADERS, &rows);
            return Ok(());
        }
        RolloutCommand::Status { id } => api.get(&format!("/v1/rollouts/{id}"))?,
        RolloutCommand::Promote { id } => {
            api.post(&format!("/v1/rollouts/{id}/promote"), &json!({}))?
        }
        RolloutCommand::Pause { id } => {
            api.post(&format!("/v1/rollouts/{id}/pause"), &json!({}))?
        }
        RolloutCommand::Resume { id } => {
            api.post(&format!("/v1/rollouts/{id}/resume"), &json!({}))?
        }
        RolloutCommand::Abort { id } => {
            api.post(&format!("/v1/rollouts/{id}/abort"), &json!({}))?
        }
    };
    if as_json {
        return print_json(&v);
    }
    print_rollout(&v);
    Ok(())
}

const ROLLOUT_HEADERS: &[&str] = &["ROLLOUT", "STATE", "STAGE", "PROGRESS", "FAILED", "APPLIES"];

fn rollout_row(r: &Value) -> Vec<String> {
    let what = if r["upgrade"].is_object() {
        format!("upgrade to {}", text(&r["upgrade"]["version"]))
    } else if r["config"].is_object() {
        format!(
            "config {} version {}",
            text(&r["config"]["name"]),
            text(&r["config"]["version"])
        )
    } else {
        r["task"]["spec"]["argv"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| text(&r["task"]["spec"]["kind"]))
    };
    vec![
        text(&r["rollout_id"]),
        text(&r["state"]),
        text(&r["stage"]),
        format!("{}/{}", text(&r["started"]), text(&r["total"])),
        text(&r["failed"]),
        what,
    ]
}

/// A progress bar of `done` out of `total`, 20 cells wide.
fn bar(done: u64, total: u64) -> String {
    let cells = done
        .saturating_mul(20)
        .checked_div(total)
        .map_or(20, |c| usize::try_from(c).unwrap_or(20));
    format!(
        "[{}{}]",
        "#".repeat(cells.min(20)),
        ".".repeat(20 - cells.min(20))
    )
}

fn print_rollout(v: &Value) {
    print_table(ROLLOUT_HEADERS, &[rollout_row(v)]);
    if let Some(reason) = v["reason"].as_str() {
        println!("reason: {reason}");
    }
    println!();
    let mut rows = Vec::new();
    for s in v["stages"].as_array().into_iter().flatten() {
        let nodes = s["nodes"].as_u64().unwrap_or(0);
        let done = s["succeeded"].as_u64().unwrap_or(0) + s["failed"].as_u64().unwrap_or(0);
        rows.push(vec![
            format!(
                "{}{}",
                if s["current"] == Value::Bool(true) {
                    "> "
                } else {
                    "  "
                },
                text(&s["name"])
            ),
            text(&s["size"]),
            format!("{} {done}/{nodes}", bar(done, nodes)),
            text(&s["succeeded"]),
            format!(
                "{} (tolerates {})",
                text(&s["failed"]),
                text(&s["allowed_failures"])
            ),
        ]);
    }
    print_table(&["STAGE", "SIZE", "PROGRESS", "SUCCEEDED", "FAILED"], &rows);
    if let Some(b) = v["batch"].as_object() {
        let states = b
            .get("states")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, n)| format!("{k}={}", text(n)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let work = match (
            b.get("upgrade_id").and_then(Value::as_u64),
            b.get("config_version").and_then(Value::as_u64),
        ) {
            (Some(id), _) => format!("upgrade {id}"),
            (None, Some(v)) => format!("config version {v}"),
            (None, None) => format!("task {}", b.get("task_id").map(text).unwrap_or_default()),
        };
        println!(
            "\nbatch {} in flight: {} nodes, {work} {states}",
            b.get("index").map(text).unwrap_or_default(),
            b.get("nodes").map(text).unwrap_or_default(),
        );
    }
}

const SCHEDULE_HEADERS: &[&str] = &[
    "SCHEDULE",
    "CRON (UTC)",
    "OVERLAP",
    "STATE",
    "NEXT FIRE",
    "LAST FIRE",
    "LAST TASK",
    "COMMAND",
];

fn schedule_row(s: &Value) -> Vec<String> {
    vec![
        text(&s["schedule_id"]),
        text(&s["cron"]),
        text(&s["overlap"]),
        if s["paused"] == Value::Bool(true) {
            "paused".into()
        } else {
            "active".into()
        },
        text(&s["next_fire_at"]),
        text(&s["last_fire_at"]),
        text(&s["last_task_id"]),
        s["task"]["spec"]["argv"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| text(&s["task"]["spec"]["kind"])),
    ]
}

fn create(api: &Api, as_json: bool, target: &Target, spec: &Value) -> Result<(), Failure> {
    let targets = match (target.nodes.is_empty(), target.labels.is_empty()) {
        (false, true) => json!({"nodes": target.nodes}),
        (true, false) => {
            let mut labels = serde_json::Map::new();
            for l in &target.labels {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("label {l:?}: use key=value")))?;
                labels.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            json!({"labels": labels})
        }
        _ => return Err(Failure::Usage("give either --nodes or --label".into())),
    };
    let mut body = json!({"targets": targets, "spec": spec});
    if let Some(t) = target.timeout_ms {
        body["timeout_ms"] = json!(t);
    }
    let created = api.post("/v1/tasks", &body)?;
    let id = created["task_id"]
        .as_u64()
        .ok_or_else(|| Failure::Api(0, format!("no task id in {created}")))?;
    if target.follow {
        return follow(api, as_json, id, Duration::from_secs(target.wait_secs));
    }
    if !target.wait {
        if as_json {
            return print_json(&created);
        }
        println!(
            "task {id} created, dispatched to {} agent(s)",
            text(&created["dispatched"])
        );
        if let Some(trace) = created["trace_id"].as_str() {
            println!("trace {trace}");
        }
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(target.wait_secs);
    loop {
        let v = api.get(&format!("/v1/tasks/{id}"))?;
        if v["finished"] == Value::Bool(true) || Instant::now() >= deadline {
            if as_json {
                print_json(&v)?;
            } else {
                print_task(&v);
            }
            let all_ok = v["targets"]
                .as_object()
                .is_some_and(|t| t.values().all(|s| s["state"] == "succeeded"));
            return if all_ok {
                Ok(())
            } else {
                Err(Failure::TasksFailed)
            };
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Reads the task's live output stream (`GET /v1/tasks/{id}/output?follow=1`, Server-Sent
/// Events) to its `end` event. With `--json`, each event is printed as one JSON line.
fn follow(api: &Api, as_json: bool, id: u64, limit: Duration) -> Result<(), Failure> {
    use std::io::BufRead;
    let response = api.stream(&format!("/v1/tasks/{id}/output?follow=1"), limit)?;
    let mut lines = LinePrinter::default();
    let mut name = String::new();
    let mut all_ok = true;
    let mut ended = false;
    for line in std::io::BufReader::new(response).lines() {
        let Ok(line) = line else {
            // The time limit (or the scheduler going away) cut the stream.
            break;
        };
        if let Some(n) = line.strip_prefix("event: ") {
            n.clone_into(&mut name);
            continue;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if as_json {
            println!("{}", json!({"event": name, "data": v}));
        }
        match name.as_str() {
            "output" if !as_json => lines.output(&v),
            "gap" if !as_json => eprintln!(
                "[{}] (output chunks {}-{} were not streamed; the result keeps the end)",
                text(&v["node"]),
                text(&v["from_seq"]),
                text(&v["to_seq"])
            ),
            "result" => {
                all_ok &= v["state"] == "succeeded";
                if !as_json {
                    lines.result(&v);
                }
            }
            "end" => {
                ended = true;
                break;
            }
            _ => {}
        }
    }
    if !ended {
        eprintln!("schedctl: stopped following task {id} after {limit:?} (it may still run)");
        return Err(Failure::TasksFailed);
    }
    if all_ok {
        Ok(())
    } else {
        Err(Failure::TasksFailed)
    }
}

/// Prints streamed output as whole lines, each prefixed by its node; a line still open
/// when its target finishes is printed then.
#[derive(Debug, Default)]
struct LinePrinter {
    /// Unfinished line per (node, stream).
    open: std::collections::BTreeMap<(String, String), String>,
    /// Nodes that printed anything.
    printed: std::collections::BTreeSet<String>,
}

impl LinePrinter {
    fn output(&mut self, v: &Value) {
        let node = text(&v["node"]);
        let stream = text(&v["stream"]);
        let buf = self.open.entry((node.clone(), stream.clone())).or_default();
        buf.push_str(v["data"].as_str().unwrap_or_default());
        while let Some(at) = buf.find('\n') {
            let line: String = buf.drain(..=at).collect();
            emit(&node, &stream, line.trim_end_matches(['\n', '\r']));
        }
        self.printed.insert(node);
    }

    fn result(&mut self, v: &Value) {
        let node = text(&v["node"]);
        for stream in ["stdout", "stderr"] {
            if let Some(rest) = self.open.remove(&(node.clone(), stream.to_owned()))
                && !rest.is_empty()
            {
                emit(&node, stream, &rest);
            }
        }
        // Nothing streamed (an older agent, or the output was no longer kept): the
        // result's tails are what there is.
        if !self.printed.contains(&node) {
            for stream in ["stdout", "stderr"] {
                let tail = v[format!("{stream}_tail")].as_str().unwrap_or_default();
                for line in tail.lines() {
                    emit(&node, stream, line);
                }
            }
        }
        let mut outcome = text(&v["state"]);
        if let Some(code) = v["exit_code"].as_i64() {
            outcome.push_str(&format!(" (exit {code})"));
        }
        if let Some(error) = v["error"].as_str() {
            outcome.push_str(&format!(": {error}"));
        }
        eprintln!("[{node}] {outcome}");
    }
}

fn emit(node: &str, stream: &str, line: &str) {
    if stream == "stderr" {
        eprintln!("[{node}] {line}");
    } else {
        println!("[{node}] {line}");
    }
}

/// An audit entry's detail on one line: the fields of a task request, or the JSON.
fn audit_detail(detail: &Value) -> String {
    if let Some(spec) = detail["request"]["spec"].as_object() {
        let what = spec
            .get("argv")
            .map(text)
            .or_else(|| spec.get("target").map(text))
            .or_else(|| spec.get("url").map(text))
            .unwrap_or_default();
        return format!("{} {what}", text(&detail["request"]["spec"]["kind"]));
    }
    match detail {
        Value::Object(m) if m.is_empty() => String::new(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn agent_row(a: &Value) -> Vec<String> {
    let labels = a["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let age = a["last_seen_ms"].as_u64().map(ago).unwrap_or_default();
    vec![
        text(&a["node_id"]),
        text(&a["state"]),
        labels,
        text(&a["version"]),
        text(&a["hostname"]),
        age,
    ]
}

fn summary_of_states(targets: &Value) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    if let Some(t) = targets.as_object() {
        for s in t.values() {
            *counts.entry(text(&s["state"])).or_default() += 1;
        }
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_task(v: &Value) {
    println!(
        "task {}  {}",
        text(&v["task_id"]),
        text(&v["spec"]["spec"]["kind"])
    );
    let results: Vec<&Value> = v["results"]
        .as_array()
        .map(|r| r.iter().collect())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = v["targets"]
        .as_object()
        .map(|targets| {
            targets
                .iter()
                .map(|(node, s)| {
                    let result = results
                        .iter()
                        .rev()
                        .find(|r| r["node_id"] == Value::String(node.clone()));
                    let (exit, out) = result.map_or((String::new(), String::new()), |r| {
                        let body = &r["body"];
                        let out = body["error"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| {
                                text(&body["stdout_tail"])
                                    .lines()
                                    .last()
                                    .unwrap_or("")
                                    .to_owned()
                            });
                        (text(&body["exit_code"]), out)
                    });
                    vec![node.clone(), text(&s["state"]), exit, out]
                })
                .collect()
        })
        .unwrap_or_default();
    print_table(&["NODE", "STATE", "EXIT", "OUTPUT (last line)"], &rows);
}

fn print_json(v: &Value) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    Ok(())
}

/// A JSON value as plain text (strings without quotes, null as empty).
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn ago(ms: u64) -> String {
    let secs = servicekit::clock::now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
    if rows.is_empty() {
        println!("(none)");
    }
}

/// The scheduler's API over HTTP or HTTPS: JSON in and out, the key as a bearer token.
struct Api {
    base: String,
    key: String,
    client: reqwest::blocking::Client,
}

impl Api {
    fn new(url: &str, key: &str, cacert: Option<&Path>) -> Result<Self, Failure> {
        use servicekit::tls;
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        let https = match scheme.as_deref() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(Failure::Usage(format!(
                    "{url}: use an http:// or https:// URL"
                )));
            }
        };
        let roots =
            match cacert {
                Some(path) => tls::roots_from_file(path)
                    .map_err(|e| Failure::Usage(format!("--cacert: {e}")))?,
                None if https => tls::platform_roots()
                    .map_err(|e| Failure::Usage(format!("{e} (use --cacert)")))?,
                None => tls::RootCertStore::empty(),
            };
        let client = servicekit::http_client::blocking_client(ClientOptions {
            roots,
            timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        })
        .map_err(|e| Failure::Usage(e.to_string()))?;
        Ok(Api {
            base: url.trim_end_matches('/').to_owned(),
            key: key.to_owned(),
            client,
        })
    }

    fn get(&self, path: &str) -> Result<Value, Failure> {
        self.request(reqwest::Method::GET, path, None)
    }

    /// Opens a streaming GET (Server-Sent Events) that may last up to `limit`.
    fn stream(&self, path: &str, limit: Duration) -> Result<reqwest::blocking::Response, Failure> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .timeout(limit)
            .send()
            .map_err(|e| Failure::Unreachable(describe(&self.base, &e)))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let body = response.bytes().unwrap_or_default();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let message = match (&value["error"], &value["detail"]) {
            (Value::String(e), Value::String(d)) => format!("{e}: {d}"),
            _ => String::from_utf8_lossy(&body).into_owned(),
        };
        Err(Failure::Api(status, message))
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.request(reqwest::Method::POST, path, Some(body))
    }

    /// POSTs raw bytes (an artifact); uploads may take longer than other calls.
    fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> Result<Value, Failure> {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(600))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        self.answer(request)
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        self.answer(request)
    }

    /// Sends `request`; the JSON body of a 2xx, the API's error otherwise.
    fn answer(&self, request: reqwest::blocking::RequestBuilder) -> Result<Value, Failure> {
        let response = request
            .send()
            .map_err(|e| Failure::Unreachable(describe(&self.base, &e)))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .map_err(|e| Failure::Unreachable(describe(&self.base, &e)))?;
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let message = match (&value["error"], &value["detail"]) {
                (Value::String(e), Value::String(d)) => format!("{e}: {d}"),
                _ => String::from_utf8_lossy(&body).into_owned(),
            };
            Err(Failure::Api(status, message))
        }
    }
}

/// A transport failure in words: the certificate problem when the TLS handshake failed,
/// otherwise the error with its causes (reqwest's own message alone says only "error
/// sending request").
fn describe(base: &str, e: &reqwest::Error) -> String {
    use servicekit::tls::TlsFailure;
    if let Some(failure) = TlsFailure::find(e) {
        let hint = match failure {
            TlsFailure::UnknownIssuer => {
                "; pass the CA that signed the scheduler's certificate with --cacert (SCHEDULER_CACERT)"
            }
            _ => "",
        };
        return format!("{base}: TLS handshake failed: {failure}{hint}");
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `schedctl tunnel`: local TCP connections bridged to tunnel WebSockets of the scheduler
/// (`GET /v1/agents/{id}/tunnel`), one per connection. A refusal (the port is not on the
/// agent's allowlist, caps, an offline agent) is printed and closes that connection; the
/// listener keeps serving.
mod tunnel {
    use std::sync::Arc;

    use futures_util::{SinkExt, StreamExt};
    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::{self, Message};

    use super::{Cli, Failure};

    /// Bytes read from a local connection per WebSocket message.
    const CHUNK: usize = 32 * 1024;

    struct Target {
        url: String,
        auth: HeaderValue,
        tls: Option<Arc<servicekit::tls::ClientConfig>>,
        node: String,
        remote: String,
    }

    /// Percent-encodes a query value (a `host:port`, so little ever needs it).
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':') {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    pub(super) fn serve(cli: &Cli, node: &str, remote: &str, local: &str) -> Result<(), Failure> {
        let base = cli.url.trim_end_matches('/');
        let (url, https) = if let Some(rest) = base.strip_prefix("https://") {
            (format!("wss://{rest}"), true)
        } else if let Some(rest) = base.strip_prefix("http://") {
            (format!("ws://{rest}"), false)
        } else {
            return Err(Failure::Usage(format!(
                "{base}: use an http:// or https:// URL"
            )));
        };
        let tls = if https {
            let roots = match &cli.cacert {
                Some(path) => servicekit::tls::roots_from_file(path)
                    .map_err(|e| Failure::Usage(format!("--cacert: {e}")))?,
                None => servicekit::tls::platform_roots()
                    .map_err(|e| Failure::Usage(format!("{e} (use --cacert)")))?,
            };
            Some(Arc::new(
                servicekit::tls::client_config(roots, &[])
                    .map_err(|e| Failure::Usage(e.to_string()))?,
            ))
        } else {
            None
        };
        let auth = HeaderValue::from_str(&format!("Bearer {}", cli.key))
            .map_err(|_| Failure::Usage("the API key is not a valid header value".into()))?;
        let target = Arc::new(Target {
            url: format!(
                "{url}/v1/agents/{}/tunnel?remote={}",
                encode(node),
                encode(remote)
            ),
            auth,
            tls,
            node: node.to_owned(),
            remote: remote.to_owned(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Failure::Usage(format!("runtime: {e}")))?;
        runtime.block_on(async move {
            let listener = TcpListener::bind(local)
                .await
                .map_err(|e| Failure::Usage(format!("--local {local}: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Failure::Usage(format!("--local {local}: {e}")))?;
            println!(
                "listening on {addr}: each connection is tunnelled to {} on {}",
                target.remote, target.node
            );
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, peer)) => {
                            let target = Arc::clone(&target);
                            tokio::spawn(async move {
                                if let Err(e) = bridge(&target, tcp).await {
                                    eprintln!("schedctl: tunnel for {peer}: {e}");
                                }
                            });
                        }
                        Err(e) => eprintln!("schedctl: accept: {e}"),
                    },
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        })
    }

    /// The scheduler's refusal as one line: `403 tunnel_not_allowed: ...`.
    fn refusal(e: &tungstenite::Error) -> String {
        match e {
            tungstenite::Error::Http(response) => {
                let status = response.status().as_u16();
                let body = response.body().as_deref().unwrap_or_default();
                let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                match (&value["error"], &value["detail"]) {
                    (Value::String(e), Value::String(d)) => format!("{status} {e}: {d}"),
                    _ => format!("{status}: {}", String::from_utf8_lossy(body)),
                }
            }
            other => other.to_string(),
        }
    }

    async fn bridge(target: &Target, mut tcp: TcpStream) -> Result<(), String> {
        let _ = tcp.set_nodelay(true);
        let mut request = target
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        request
            .headers_mut()
            .insert("authorization", target.auth.clone());
        let connector = target
            .tls
            .as_ref()
            .map(|c| tokio_tungstenite::Connector::Rustls(Arc::clone(c)));
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
                .await
                .map_err(|e| format!("refused: {}", refusal(&e)))?;
        let (mut sink, mut stream) = ws.split();
        let (mut rd, mut wr) = tcp.split();
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                read = rd.read(&mut buf) => match read {
                    Ok(0) | Err(_) => {
                        let _ = sink.send(Message::Close(None)).await;
                        return Ok(());
                    }
                    Ok(n) => sink
                        .send(Message::binary(buf[..n].to_vec()))
                        .await
                        .map_err(|e| e.to_string())?,
                },
                msg = stream.next() => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        if wr.write_all(&b).await.is_err() {
                            let _ = sink.send(Message::Close(None)).await;
                            return Ok(());
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let _ = wr.shutdown().await;
                        return match frame {
                            Some(f) if !f.reason.starts_with("closed") && !f.reason.is_empty() => {
                                Err(format!("closed by the scheduler: {}", f.reason))
                            }
                            _ => Ok(()),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Ok(()),
                },
            }
        }
    }
}
