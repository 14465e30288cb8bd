//! The scheduler's durable state: the agent registry, tasks with their per-target state
//! machines, results and status reports, schedules (`schedules.rs`), config documents
//! (`configs.rs`) and staged rollouts (`rollouts.rs`), all in one redb file.
//!
//! This module owns the on-disk layout (the `scheduler_*` tables), task id allocation, the
//! task state machine and its validation, and idempotent ingestion of agent messages by
//! message id. It never reads the clock and never talks to the network: every time is a
//! parameter, and callers turn the returned state changes into events and acknowledgements.
//!
//! # Durability
//! Every mutating call runs in exactly one redb write transaction committed with
//! [`redb::Durability::Immediate`]: when it returns `Ok` the change is on disk (the commit
//! fsyncs) and survives a `kill -9` or a power cut; when it returns `Err` or the process dies
//! during the call, none of the change is visible. Indexes (pending tasks per agent, attempt
//! deadlines, result and report ids) move in the same transaction as the rows they index, so
//! they cannot drift apart after a crash. A duplicate message that changes nothing is
//! aborted rather than committed, so acknowledging a replay costs no fsync.
//!
//! All calls block on disk I/O; async callers should run them on a blocking thread
//! (`tokio::task::spawn_blocking`). A [`Store`] is `Sync`: redb serialises writers and readers
//! see committed snapshots.
//!
//! Values are MessagePack (`rmp_serde::to_vec_named`, so fields are matched by name and new
//! optional fields can be added later).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use messages::UserId;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use servicekit::durable::{self, DbError};

mod configs;
mod operator;
mod rollouts;
mod schedules;
mod upgrades;
pub use configs::{
    CONFIG_HISTORY, ConfigNodeStatus, ConfigRecord, ConfigState, ConfigVersion, NewConfigAck,
    NewConfigVersion,
};
pub use operator::{
    AuditEntry, Created, IdempotencyClaim, MAX_AUDIT_LIST, MAX_IDEMPOTENCY_KEY_LEN, NewAuditEntry,
};
pub use rollouts::{
    BATCH_HISTORY, BatchOutcome, Control, Controlled, InFlight, MAX_STAGES, NewRollout,
    RolloutAction, RolloutConfig, RolloutId, RolloutRecord, RolloutState, RolloutTask,
    RolloutUpgrade, Size, Stage, StagePlan, StartedWork, Step, Work, default_stages, plan_stages,
    rollout_order,
};
pub use schedules::{
    Fire, NewSchedule, Overlap, SCHEDULE_ACTOR, ScheduleId, ScheduleRecord, fire_key,
};
pub use upgrades::{ArtifactRecord, NewUpgrade, UpgradeNodeStatus, UpgradeRecord, UpgradeState};

/// Small counters: format version and the next task id.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("scheduler_meta");
/// Agents: node id -> [`AgentRecord`].
const AGENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("scheduler_agents");
/// Tasks: task id -> `TaskRow`.
const TASKS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("scheduler_tasks");
/// Per-target state: (task id, node id) -> [`TargetStatus`].
const TARGETS: TableDefinition<'_, (u64, &str), &[u8]> = TableDefinition::new("scheduler_targets");
/// Index of targets in [`TargetState::Pending`]: (node id, task id).
const PENDING: TableDefinition<'_, (&str, u64), ()> = TableDefinition::new("scheduler_pending");
/// Index of in-flight targets by attempt deadline: (deadline ms, task id, node id).
const DEADLINES: TableDefinition<'_, (u64, u64, &str), ()> =
    TableDefinition::new("scheduler_deadlines");
/// Results: (node id, message id) -> [`StoredResult`]. Also the idempotency set.
const RESULTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("scheduler_results");
/// Index of results per task: (task id, node id, message id).
const TASK_RESULTS: TableDefinition<'_, (u64, &str, &str), ()> =
    TableDefinition::new("scheduler_task_results");
/// Retained reports: (node id, report sequence) -> [`Report`].
const REPORTS: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("scheduler_reports");
/// Report idempotency set: (node id, message id) -> report sequence.
const REPORT_IDS: TableDefinition<'_, (&str, &str), u64> =
    TableDefinition::new("scheduler_report_ids");
/// The same set in arrival order, for trimming: (node id, report sequence) -> message id.
const REPORT_ID_ORDER: TableDefinition<'_, (&str, u64), &str> =
    TableDefinition::new("scheduler_report_id_order");

const META_FORMAT: &str = "format";
const FORMAT_VERSION: u64 = 1;
/// The id the next created task gets. Persisted so ids never repeat, even after deletions.
const META_NEXT_TASK_ID: &str = "next_task_id";

/// Longest message id accepted (outbox ids are 32 hex digits, a dash and a decimal u64).
pub const MAX_MESSAGE_ID_LEN: usize = 256;

/// A task's id: allocated from 1 upwards, strictly increasing, never reused in one file.
pub type TaskId = u64;

/// Required labels: an agent matches when it has every `key = value` pair.
pub type LabelSelector = BTreeMap<String, String>;

/// Why a store operation failed.
///
/// After a failed commit ([`DbError::Commit`]) redb refuses further write transactions on
/// the open database; drop the [`Store`] and open it again, which repairs the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening, reading or writing the redb file failed.
    #[error("store: {0}")]
    Db(#[from] DbError),
    /// A value could not be encoded.
    #[error("store: cannot encode a {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's error.
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// The file holds values this code did not write (or a newer format).
    #[error("store: corrupt or foreign file: {0}")]
    Corrupt(String),
    /// No agent with this node id is registered.
    #[error("unknown agent {0}")]
    UnknownAgent(UserId),
    /// No task with this id exists.
    #[error("unknown task {0}")]
    UnknownTask(TaskId),
    /// The task exists but the node is not one of its targets.
    #[error("agent {node_id} is not a target of task {task_id}")]
    NotATarget {
        /// The task.
        task_id: TaskId,
        /// The node.
        node_id: UserId,
    },
    /// The requested state change is not allowed from the target's current state.
    #[error("task {task_id} on {node_id}: cannot go from {from:?} to {to:?}")]
    InvalidTransition {
        /// The task.
        task_id: TaskId,
        /// The target node.
        node_id: UserId,
        /// The target's current state.
        from: TargetState,
        /// The state that was asked for.
        to: TargetState,
    },
    /// The task spec is unusable (the message says why); nothing was stored.
    #[error("invalid task: {0}")]
    InvalidSpec(String),
    /// The task's targets resolved to no agent; nothing was stored.
    #[error("task has no targets (no agent matches)")]
    NoTargets,
    /// A message id is empty or longer than [`MAX_MESSAGE_ID_LEN`].
    #[error("invalid message id (empty or longer than {MAX_MESSAGE_ID_LEN} bytes)")]
    InvalidMessageId,
    /// 2^64 - 1 tasks have been created in this file.
    #[error("task ids exhausted")]
    TaskIdsExhausted,
    /// No schedule with this id exists.
    #[error("unknown schedule {0}")]
    UnknownSchedule(u64),
    /// A config document request is unusable (the message says why); nothing was stored.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// No config document with this name exists.
    #[error("unknown config {0:?}")]
    UnknownConfig(String),
    /// The config document has no such version (never created, or pruned from history).
    #[error("config {name:?} has no version {version} (never created or no longer kept)")]
    UnknownConfigVersion {
        /// The document.
        name: String,
        /// The version asked for.
        version: u64,
    },
    /// A config rollout of this document is unfinished: setting or rolling back its desired
    /// version would fight it (abort it first).
    #[error("config {name:?} is being rolled out by rollout {rollout}; abort it first")]
    ConfigInRollout {
        /// The document.
        name: String,
        /// The unfinished rollout.
        rollout: u64,
    },
    /// A rollout request is unusable (the message says why); nothing was stored.
    #[error("invalid rollout: {0}")]
    InvalidRollout(String),
    /// No rollout with this id exists.
    #[error("unknown rollout {0}")]
    UnknownRollout(u64),
    /// The rollout's state does not allow this control.
    #[error("rollout {id} is {state:?}: cannot {control}")]
    RolloutConflict {
        /// The rollout.
        id: u64,
        /// The control asked for.
        control: &'static str,
        /// Its state.
        state: RolloutState,
    },
    /// An upgrade request is unusable (the message says why); nothing was stored.
    #[error("invalid upgrade: {0}")]
    InvalidUpgrade(String),
    /// No artifact with this SHA-256 was uploaded.
    #[error("unknown artifact {0}")]
    UnknownArtifact(String),
    /// No upgrade with this id exists.
    #[error("unknown upgrade {0}")]
    UnknownUpgrade(u64),
    /// An idempotency key was used again with a different request; nothing was stored.
    #[error("idempotency key {key:?} was already used with a different request (task {task_id})")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The task the key created first.
        task_id: TaskId,
    },
}

servicekit::redb_errors!(StoreError);

/// An agent's liveness as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Heartbeating and healthy.
    Online,
    /// Heartbeating, but reports a problem (for example a nearly full disk).
    Degraded,
    /// Missed its heartbeats; tasks for it wait in [`TargetState::Pending`].
    Offline,
}

impl AgentState {
    /// Whether an agent in this state can take work now.
    pub fn is_up(self) -> bool {
        matches!(self, AgentState::Online | AgentState::Degraded)
    }
}

/// One registered agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The node id (the agent token's subject).
    pub node_id: UserId,
    /// Host name the agent reported.
    pub hostname: String,
    /// Agent software version.
    pub version: String,
    /// Labels used by task selectors.
    pub labels: BTreeMap<String, String>,
    /// Addresses the agent reported.
    pub addresses: Vec<String>,
    /// When the agent registered, unix ms.
    pub registered_at_ms: u64,
    /// Last register or heartbeat, unix ms.
    pub last_seen_ms: u64,
    /// Current liveness.
    pub state: AgentState,
    /// The relay agent the node's connection goes through (ADR 0015); `None` when it is
    /// connected to a gateway directly. As of its last register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<UserId>,
}

impl AgentRecord {
    /// Whether this agent has every label in `selector` (an empty selector matches all).
    pub fn matches(&self, selector: &LabelSelector) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

/// What a task does on each target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Run a command (no shell).
    Command {
        /// Program and arguments; must not be empty.
        argv: Vec<String>,
        /// Extra environment variables.
        env: BTreeMap<String, String>,
        /// Working directory; the agent's default when `None`.
        cwd: Option<String>,
        /// The agent kills the process group after this long.
        timeout_ms: u64,
    },
    /// Open a TCP connection to `target` (`host:port`).
    TcpProbe {
        /// `host:port`.
        target: String,
        /// Connect timeout.
        timeout_ms: u64,
    },
    /// Request `url` and report status and latency.
    HttpProbe {
        /// The URL.
        url: String,
        /// Request timeout.
        timeout_ms: u64,
    },
}

/// Which agents a task runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Targets {
    /// These registered agents (duplicates are ignored).
    Nodes(Vec<UserId>),
    /// Every agent registered at creation time whose labels match (not empty). Agents that
    /// register later are not added.
    Selector(LabelSelector),
}

/// What to run, where, and the retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// What to do.
    pub kind: TaskKind,
    /// Where to do it; resolved to node ids by [`Store::create_task`].
    pub targets: Targets,
    /// How long one attempt may stay dispatched or running before
    /// [`Store::expire_dispatched_before`] expires it; at least 1.
    pub timeout_ms: u64,
    /// Attempts per target including the first; at least 1.
    pub max_attempts: u32,
    /// W3C `traceparent` of the request that created the task, so every dispatch (also a
    /// later one, to an agent that was offline) continues that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The state of one task on one target.
///
/// Legal transitions (anything else is [`StoreError::InvalidTransition`]):
/// `Pending -> Dispatched | Cancelled`,
/// `Dispatched -> Running`,
/// `Dispatched | Running -> Succeeded | Failed | TimedOut | Cancelled`, and
/// `Dispatched | Running -> Pending` (an expired attempt with attempts left).
/// The four terminal states never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Waiting to be sent (the agent may be offline).
    Pending,
    /// Sent to the agent, not yet acknowledged as started.
    Dispatched,
    /// The agent said it started.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished with a non-zero exit code or an error.
    Failed,
    /// The last attempt passed its deadline.
    TimedOut,
    /// Cancelled by an operator.
    Cancelled,
}

impl TargetState {
    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TargetState::Succeeded
                | TargetState::Failed
                | TargetState::TimedOut
                | TargetState::Cancelled
        )
    }

    /// Whether an attempt is under way (and has a deadline).
    pub fn is_in_flight(self) -> bool {
        matches!(self, TargetState::Dispatched | TargetState::Running)
    }

    /// Whether `self -> next` is a legal transition (see the type's docs).
    pub fn can_transition_to(self, next: TargetState) -> bool {
        use TargetState::*;
        match self {
            Pending => matches!(next, Dispatched | Cancelled),
            Dispatched => matches!(
                next,
                Running | Succeeded | Failed | TimedOut | Cancelled | Pending
            ),
            Running => matches!(next, Succeeded | Failed | TimedOut | Cancelled | Pending),
            Succeeded | Failed | TimedOut | Cancelled => false,
        }
    }
}

/// What an agent reported for one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultBody {
    /// The command's exit code (`None` for probes or when it did not exit normally).
    pub exit_code: Option<i32>,
    /// The end of standard output.
    pub stdout_tail: String,
    /// The end of standard error.
    pub stderr_tail: String,
    /// Why the attempt failed, if it did (probe error, spawn failure, killed on timeout).
    pub error: Option<String>,
    /// Probe latency.
    pub latency_ms: Option<u64>,
    /// When the attempt finished on the agent, unix ms.
    pub finished_at_ms: u64,
    /// Live output chunks the attempt cut (see `fleet::TaskResult::output_chunks`).
    #[serde(default)]
    pub output_chunks: u64,
}

impl ResultBody {
    /// Success means no error and, for commands, exit code 0.
    pub fn is_success(&self) -> bool {
        self.error.is_none() && self.exit_code.is_none_or(|c| c == 0)
    }
}

/// One task's state on one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Current state.
    pub state: TargetState,
    /// Attempts dispatched so far.
    pub attempts: u32,
    /// When the current (or last) attempt was dispatched, unix ms.
    pub dispatched_at_ms: Option<u64>,
    /// When the current attempt expires, unix ms (`dispatched_at_ms + timeout_ms`).
    pub deadline_ms: Option<u64>,
    /// Time of the last state change, unix ms.
    pub updated_at_ms: u64,
    /// The result that finished this target, if one did.
    pub result: Option<ResultBody>,
}

/// A task with every target's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The id.
    pub id: TaskId,
    /// The spec as created (targets as given, not resolved).
    pub spec: TaskSpec,
    /// Creation time, unix ms.
    pub created_at_ms: u64,
    /// Resolved targets and their states.
    pub targets: BTreeMap<UserId, TargetStatus>,
}

/// A task with the number of targets in each state, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSummary {
    /// The id.
    pub id: TaskId,
    /// The spec as created.
    pub spec: TaskSpec,
    /// Creation time, unix ms.
    pub created_at_ms: u64,
    /// Targets per state (states with no target are absent).
    pub states: BTreeMap<TargetState, u64>,
}

impl TaskSummary {
    /// Whether every target is in a terminal state.
    pub fn is_finished(&self) -> bool {
        self.states.keys().all(|s| s.is_terminal())
    }
}

/// A stored result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResult {
    /// The agent's message id.
    pub message_id: String,
    /// The task.
    pub task_id: TaskId,
    /// The agent.
    pub node_id: UserId,
    /// What it reported.
    pub body: ResultBody,
    /// Whether it finished the target. `false` when it arrived after the target had left
    /// `Dispatched`/`Running` (cancelled, timed out, or requeued for another attempt): it is
    /// kept, but changes no state.
    pub applied: bool,
}

/// A stored status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The agent's message id.
    pub message_id: String,
    /// The agent.
    pub node_id: UserId,
    /// When the scheduler received it, unix ms.
    pub received_at_ms: u64,
    /// The metrics as the agent sent them.
    pub metrics: serde_json::Value,
}

/// Stored form of a report: the metrics as JSON text, so any JSON round-trips exactly.
#[derive(Serialize, Deserialize)]
struct ReportRow {
    message_id: String,
    received_at_ms: u64,
    metrics_json: String,
}

/// Stored form of a task (targets live in their own table).
#[derive(Serialize, Deserialize)]
struct TaskRow {
    spec: TaskSpec,
    created_at_ms: u64,
}

/// One result to ingest with [`Store::record_results`].
#[derive(Debug, Clone, Copy)]
pub struct NewResult<'a> {
    /// The agent's outbox message id (the idempotency key).
    pub message_id: &'a str,
    /// The task.
    pub task_id: TaskId,
    /// The agent that ran it.
    pub node_id: &'a UserId,
    /// What it reported.
    pub body: &'a ResultBody,
}

/// Outcome of an idempotent ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// First time this message id was seen from this agent; it is now stored.
    New,
    /// Already ingested; nothing changed. Acknowledge it again.
    Duplicate,
}

/// An expired attempt, as returned by [`Store::expire_dispatched_before`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The task.
    pub task_id: TaskId,
    /// The target.
    pub node_id: UserId,
    /// [`TargetState::Pending`] when attempts remain, else [`TargetState::TimedOut`].
    pub new_state: TargetState,
}

/// One heartbeat for [`Store::touch_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The agent.
    pub node_id: UserId,
    /// When it was seen, unix ms.
    pub at_ms: u64,
    /// Whether it reported itself degraded.
    pub degraded: bool,
}

/// What [`Store::touch_many`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TouchOutcome {
    /// Agents whose state changed: (node, old state, new state).
    pub changes: Vec<(UserId, AgentState, AgentState)>,
    /// Heartbeats from agents that are not registered (ask them to register again).
    pub unknown: Vec<UserId>,
}

/// Row counts, mostly for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Registered agents.
    pub agents: u64,
    /// Tasks.
    pub tasks: u64,
    /// Stored results.
    pub results: u64,
    /// Retained reports (all agents).
    pub reports: u64,
}

/// Tunables for [`Store::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Reports kept per agent; older ones are deleted as new ones arrive (at least 1).
    pub reports_per_agent: u64,
    /// Report message ids remembered per agent for deduplication (at least
    /// `reports_per_agent`). A replay of a report older than this window is stored again.
    pub report_ids_per_agent: u64,
    /// redb page cache size in bytes.
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            reports_per_agent: 100,
            report_ids_per_agent: 10_000,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The scheduler's state in one redb file. See the module docs for the guarantees.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
    options: StoreOptions,
}

impl Store {
    /// The database, for modules that keep tables of their own in the same file
    /// ([`crate::trust`]).
    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Opens (or creates) the store at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(path, StoreOptions::default())
    }

    /// Opens (or creates) the store at `path`, creating its directory if needed. After a
    /// crash redb repairs the file here.
    pub fn open_with(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let reports_per_agent = options.reports_per_agent.max(1);
        let options = StoreOptions {
            reports_per_agent,
            report_ids_per_agent: options.report_ids_per_agent.max(reports_per_agent),
            cache_bytes: options.cache_bytes,
        };
        let db = durable::open(&path, options.cache_bytes)?;

        // Tables and counters are created in one transaction: a crash during first open
        // leaves either an initialised file or an empty one.
        let txn = begin_durable_write(&db)?;
        {
            let mut meta = txn.open_table(META)?;
            let format = meta.get(META_FORMAT)?.map(|v| v.value());
            match format {
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION)?;
                }
                Some(FORMAT_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Corrupt(format!(
                        "format version {other}, this scheduler understands {FORMAT_VERSION}"
                    )));
                }
            }
            if meta.get(META_NEXT_TASK_ID)?.is_none() {
                meta.insert(META_NEXT_TASK_ID, 1u64)?;
            }
        }
        txn.open_table(AGENTS)?;
        txn.open_table(TASKS)?;
        txn.open_table(TARGETS)?;
        txn.open_table(PENDING)?;
        txn.open_table(DEADLINES)?;
        txn.open_table(RESULTS)?;
        txn.open_table(TASK_RESULTS)?;
        txn.open_table(REPORTS)?;
        txn.open_table(REPORT_IDS)?;
        txn.open_table(REPORT_ID_ORDER)?;
        operator::create_tables(&txn)?;
        schedules::create_tables(&txn)?;
        configs::create_tables(&txn)?;
        rollouts::create_tables(&txn)?;
        upgrades::create_tables(&txn)?;
        txn.commit()?;
        Ok(Store { db, path, options })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options in effect (after clamping).
    pub fn options(&self) -> StoreOptions {
        self.options
    }

    /// Runs `f` in one durable write transaction and commits if it returns `Ok`; on `Err` the
    /// transaction is dropped, which aborts it.
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = begin_durable_write(&self.db)?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// Like [`Store::write`], for batch calls whose inputs may all be refused: `f` also says
    /// whether it changed anything, and a transaction that changed nothing is aborted
    /// rather than committed, so it costs no fsync.
    fn write_if_changed<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let txn = begin_durable_write(&self.db)?;
        let (out, changed) = f(&txn)?;
        if changed {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(out)
    }

    // ----- agents -------------------------------------------------------------------------

    /// Inserts or replaces an agent (on register). Returns its previous state, or `None` if
    /// it was not registered. The record is stored as given, so a re-registering caller that
    /// wants to keep the first `registered_at_ms` should read [`Store::agent`] first.
    pub fn upsert_agent(&self, record: &AgentRecord) -> Result<Option<AgentState>, StoreError> {
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let old = match agents.get(record.node_id.as_str())? {
                Some(v) => Some(decode::<AgentRecord>(v.value(), "agent")?.state),
                None => None,
            };
            agents.insert(record.node_id.as_str(), encode(record, "agent")?.as_slice())?;
            Ok(old)
        })
    }

    /// Sets an agent's state in one transaction (read and write together, so a concurrent
    /// register cannot be overwritten with a stale record). Returns the previous state when
    /// it changed; `None` when it was already `state` or the agent is not registered.
    pub fn set_agent_state(
        &self,
        node_id: &UserId,
        state: AgentState,
    ) -> Result<Option<AgentState>, StoreError> {
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut rec: AgentRecord = match agents.get(node_id.as_str())? {
                Some(v) => decode(v.value(), "agent")?,
                None => return Ok(None),
            };
            if rec.state == state {
                return Ok(None);
            }
            let old = rec.state;
            rec.state = state;
            agents.insert(node_id.as_str(), encode(&rec, "agent")?.as_slice())?;
            Ok(Some(old))
        })
    }

    /// Sets the relay a known agent connects through (ADR 0015); `false` when the agent is
    /// unknown or already had that value (then nothing is written).
    pub fn set_agent_via(
        &self,
        node_id: &UserId,
        via: Option<&UserId>,
    ) -> Result<bool, StoreError> {
        match self.agent(node_id)? {
            Some(rec) if rec.via.as_ref() != via => {}
            _ => return Ok(false),
        }
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut rec: AgentRecord = match agents.get(node_id.as_str())? {
                Some(v) => decode(v.value(), "agent")?,
                None => return Ok(false),
            };
            rec.via = via.cloned();
            agents.insert(node_id.as_str(), encode(&rec, "agent")?.as_slice())?;
            Ok(true)
        })
    }

    /// Records a heartbeat: `last_seen_ms` becomes `at_ms` and the state Online or Degraded.
    /// Returns the old state if the state changed. A heartbeat older than `last_seen_ms`
    /// (reordered delivery) changes nothing.
    pub fn touch(
        &self,
        node_id: &UserId,
        at_ms: u64,
        degraded: bool,
    ) -> Result<Option<AgentState>, StoreError> {
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            match touch_in(&mut agents, node_id, at_ms, degraded)? {
                Some(change) => Ok(change.map(|(old, _)| old)),
                None => Err(StoreError::UnknownAgent(node_id.clone())),
            }
        })
    }

    /// [`Store::touch`] for a batch of heartbeats in one transaction (one fsync), for the
    /// gateways' heartbeat batches. Unknown agents are reported, not an error.
    pub fn touch_many(&self, beats: &[Heartbeat]) -> Result<TouchOutcome, StoreError> {
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut out = TouchOutcome::default();
            for b in beats {
                match touch_in(&mut agents, &b.node_id, b.at_ms, b.degraded)? {
                    Some(Some((old, new))) => out.changes.push((b.node_id.clone(), old, new)),
                    Some(None) => {}
                    None => out.unknown.push(b.node_id.clone()),
                }
            }
            Ok(out)
        })
    }

    /// Those of `nodes` that are registered and up, in order, read in one transaction (a
    /// fan-out to thousands of targets reads them all at once).
    pub fn up_of<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a UserId>,
    ) -> Result<Vec<UserId>, StoreError> {
        let txn = self.db.begin_read()?;
        let agents = txn.open_table(AGENTS)?;
        let mut up = Vec::new();
        for node in nodes {
            if let Some(v) = agents.get(node.as_str())? {
                let rec: AgentRecord = decode(v.value(), "agent")?;
                if rec.state.is_up() {
                    up.push(node.clone());
                }
            }
        }
        Ok(up)
    }

    /// One agent, if registered.
    pub fn agent(&self, node_id: &UserId) -> Result<Option<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let agents = txn.open_table(AGENTS)?;
        match agents.get(node_id.as_str())? {
            Some(v) => Ok(Some(decode(v.value(), "agent")?)),
            None => Ok(None),
        }
    }

    /// Agents that have every label in `selector` (empty: all) and, if given, are in
    /// `state`; ordered by node id.
    pub fn agents(
        &self,
        selector: &LabelSelector,
        state: Option<AgentState>,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let agents = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for item in agents.iter()? {
            let (_, v) = item?;
            let rec: AgentRecord = decode(v.value(), "agent")?;
            if rec.matches(selector) && state.is_none_or(|s| s == rec.state) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Marks Offline every agent not already offline whose `last_seen_ms` is before
    /// `cutoff_ms`, and returns exactly those agents with their previous state.
    pub fn mark_offline_before(
        &self,
        cutoff_ms: u64,
    ) -> Result<Vec<(UserId, AgentState)>, StoreError> {
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut stale = Vec::new();
            for item in agents.iter()? {
                let (_, v) = item?;
                let rec: AgentRecord = decode(v.value(), "agent")?;
                if rec.state != AgentState::Offline && rec.last_seen_ms < cutoff_ms {
                    stale.push(rec);
                }
            }
            let mut changed = Vec::with_capacity(stale.len());
            for mut rec in stale {
                let old = rec.state;
                rec.state = AgentState::Offline;
                agents.insert(rec.node_id.as_str(), encode(&rec, "agent")?.as_slice())?;
                changed.push((rec.node_id, old));
            }
            Ok(changed)
        })
    }

    // ----- tasks --------------------------------------------------------------------------

    /// Validates `spec`, resolves its targets to registered agents (of any state: tasks for
    /// offline agents wait as Pending), and stores the task with every target Pending.
    ///
    /// Errors: [`StoreError::InvalidSpec`], [`StoreError::UnknownAgent`] for an explicit id
    /// that is not registered, [`StoreError::NoTargets`] when a selector matches nobody.
    pub fn create_task(&self, spec: &TaskSpec, created_at_ms: u64) -> Result<TaskId, StoreError> {
        validate_spec(spec)?;
        self.write(|txn| create_task_in(txn, spec, created_at_ms))
    }

    /// Pending → Dispatched: the task was sent to `node_id` at `at_ms`. Counts an attempt and
    /// sets the attempt's deadline to `at_ms + spec.timeout_ms`.
    pub fn mark_dispatched(
        &self,
        task_id: TaskId,
        node_id: &UserId,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.mark_dispatched_many(task_id, std::slice::from_ref(node_id), at_ms)?
            .pop()
            .unwrap_or(Ok(0))
            .map(|_| ())
    }

    /// [`Store::mark_dispatched`] for many targets of one task in one transaction, so a
    /// fan-out to thousands of agents costs one fsync, not one each. Returns, per node in
    /// order, the attempt number now dispatched or why that node was skipped (not a target,
    /// not Pending); those skips change nothing. An unknown task or a storage error fails
    /// the whole call and changes nothing.
    pub fn mark_dispatched_many(
        &self,
        task_id: TaskId,
        nodes: &[UserId],
        at_ms: u64,
    ) -> Result<Vec<Result<u32, StoreError>>, StoreError> {
        self.write_if_changed(|txn| {
            let mut t = TaskTables::open(txn)?;
            let row = t.task_row(task_id)?;
            let mut out = Vec::with_capacity(nodes.len());
            for node_id in nodes {
                let old = match t.target(task_id, node_id) {
                    Ok(old) => old,
                    Err(e @ StoreError::NotATarget { .. }) => {
                        out.push(Err(e));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Err(e) = check(task_id, node_id, old.state, TargetState::Dispatched) {
                    out.push(Err(e));
                    continue;
                }
                let new = TargetStatus {
                    state: TargetState::Dispatched,
                    attempts: old.attempts.saturating_add(1),
                    dispatched_at_ms: Some(at_ms),
                    deadline_ms: Some(at_ms.saturating_add(row.spec.timeout_ms)),
                    updated_at_ms: at_ms,
                    result: None,
                };
                t.put_target(task_id, node_id, Some(&old), &new)?;
                out.push(Ok(new.attempts));
            }
            let changed = out.iter().any(Result::is_ok);
            Ok((out, changed))
        })
    }

    /// Dispatched → Running: the agent said it started. The deadline is unchanged.
    pub fn mark_running(
        &self,
        task_id: TaskId,
        node_id: &UserId,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.mark_running_many(&[(task_id, node_id, at_ms)])?
            .pop()
            .unwrap_or(Ok(()))
    }

    /// [`Store::mark_running`] for many targets in one transaction (agents report
    /// `started` in the same burst as their results). One outcome per input, in order: an
    /// unknown task, a non-target or a refused transition (a late `started` after the
    /// result) is that input's error and changes nothing. Aborted, without an fsync, when
    /// nothing changed.
    pub fn mark_running_many(
        &self,
        started: &[(TaskId, &UserId, u64)],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.write_if_changed(|txn| {
            let mut out = Vec::with_capacity(started.len());
            let mut t = TaskTables::open(txn)?;
            for &(task_id, node_id, at_ms) in started {
                let old = match t.task_row(task_id).and_then(|_| t.target(task_id, node_id)) {
                    Ok(old) => old,
                    Err(e @ (StoreError::UnknownTask(_) | StoreError::NotATarget { .. })) => {
                        out.push(Err(e));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Err(e) = check(task_id, node_id, old.state, TargetState::Running) {
                    out.push(Err(e));
                    continue;
                }
                let new = TargetStatus {
                    state: TargetState::Running,
                    updated_at_ms: at_ms,
                    ..old.clone()
                };
                t.put_target(task_id, node_id, Some(&old), &new)?;
                out.push(Ok(()));
            }
            let changed = out.iter().any(Result::is_ok);
            Ok((out, changed))
        })
    }

    /// Cancels one target (Pending, Dispatched or Running) and returns its previous state,
    /// so the caller knows whether to tell the agent. A terminal target is
    /// [`StoreError::InvalidTransition`].
    pub fn cancel_target(
        &self,
        task_id: TaskId,
        node_id: &UserId,
        at_ms: u64,
    ) -> Result<TargetState, StoreError> {
        self.write(|txn| {
            let mut t = TaskTables::open(txn)?;
            t.task_row(task_id)?;
            let old = t.target(task_id, node_id)?;
            check(task_id, node_id, old.state, TargetState::Cancelled)?;
            let new = TargetStatus {
                state: TargetState::Cancelled,
                updated_at_ms: at_ms,
                ..old.clone()
            };
            t.put_target(task_id, node_id, Some(&old), &new)?;
            Ok(old.state)
        })
    }

    /// Cancels every target of the task that is not terminal; returns those targets with
    /// their previous state (empty if the task had already finished).
    pub fn cancel(
        &self,
        task_id: TaskId,
        at_ms: u64,
    ) -> Result<Vec<(UserId, TargetState)>, StoreError> {
        self.write(|txn| cancel_in(txn, task_id, at_ms))
    }

    /// Expires every in-flight attempt (Dispatched or Running) whose deadline is before
    /// `cutoff_ms` (pass the current time): back to Pending when the task has attempts left,
    /// otherwise TimedOut. Returns what changed, in deadline order.
    pub fn expire_dispatched_before(&self, cutoff_ms: u64) -> Result<Vec<Expired>, StoreError> {
        self.write(|txn| {
            let mut t = TaskTables::open(txn)?;
            let mut due = Vec::new();
            for item in t.deadlines.range(..(cutoff_ms, 0u64, ""))? {
                let (k, _) = item?;
                let (_, task_id, node) = k.value();
                due.push((task_id, parse_node(node)?));
            }
            let mut out = Vec::with_capacity(due.len());
            for (task_id, node_id) in due {
                let row = t.task_row(task_id)?;
                let old = t.target(task_id, &node_id)?;
                let retry = old.attempts < row.spec.max_attempts;
                let new = if retry {
                    TargetStatus {
                        state: TargetState::Pending,
                        dispatched_at_ms: None,
                        deadline_ms: None,
                        updated_at_ms: cutoff_ms,
                        ..old.clone()
                    }
                } else {
                    TargetStatus {
                        state: TargetState::TimedOut,
                        updated_at_ms: cutoff_ms,
                        ..old.clone()
                    }
                };
                check(task_id, &node_id, old.state, new.state)?;
                t.put_target(task_id, &node_id, Some(&old), &new)?;
                out.push(Expired {
                    task_id,
                    node_id,
                    new_state: new.state,
                });
            }
            Ok(out)
        })
    }

    /// Tasks waiting to be sent to `node_id` (its Pending targets), oldest task first. Call
    /// when the agent registers or comes back online, then [`Store::mark_dispatched`] each.
    pub fn pending_for(&self, node_id: &UserId) -> Result<Vec<(TaskId, TaskSpec)>, StoreError> {
        let txn = self.db.begin_read()?;
        let pending = txn.open_table(PENDING)?;
        let tasks = txn.open_table(TASKS)?;
        let mut out = Vec::new();
        let node = node_id.as_str();
        for item in pending.range((node, 0u64)..=(node, u64::MAX))? {
            let (k, _) = item?;
            let (_, task_id) = k.value();
            let row = read_task_row(&tasks, task_id)?;
            out.push((task_id, row.spec));
        }
        Ok(out)
    }

    /// One task with every target's state, if it exists.
    pub fn task(&self, task_id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let tasks = txn.open_table(TASKS)?;
        let targets = txn.open_table(TARGETS)?;
        let row = match tasks.get(task_id)? {
            Some(v) => decode::<TaskRow>(v.value(), "task")?,
            None => return Ok(None),
        };
        Ok(Some(TaskRecord {
            id: task_id,
            spec: row.spec,
            created_at_ms: row.created_at_ms,
            targets: read_targets(&targets, task_id)?.into_iter().collect(),
        }))
    }

    /// Up to `limit` tasks, newest first; with `state`, only tasks that have at least one
    /// target in that state.
    pub fn tasks(
        &self,
        limit: usize,
        state: Option<TargetState>,
    ) -> Result<Vec<TaskSummary>, StoreError> {
        let txn = self.db.begin_read()?;
        let tasks = txn.open_table(TASKS)?;
        let targets = txn.open_table(TARGETS)?;
        let mut out = Vec::new();
        for item in tasks.iter()?.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let id = k.value();
            let row: TaskRow = decode(v.value(), "task")?;
            let mut states = BTreeMap::new();
            for (_, s) in read_targets(&targets, id)? {
                *states.entry(s.state).or_insert(0u64) += 1;
            }
            if state.is_none_or(|s| states.contains_key(&s)) {
                out.push(TaskSummary {
                    id,
                    spec: row.spec,
                    created_at_ms: row.created_at_ms,
                    states,
                });
            }
        }
        Ok(out)
    }

    // ----- results and reports ------------------------------------------------------------

    /// Stores a result, idempotently by (`node_id`, `message_id`).
    ///
    /// First time: the result is stored and, if the target is Dispatched or Running, finishes
    /// it as Succeeded or Failed ([`ResultBody::is_success`]); a result for a target in any
    /// other state is kept with `applied = false` and changes no state. Returns
    /// [`Ingest::New`]. A repeat of the same message id changes nothing and returns
    /// [`Ingest::Duplicate`]: acknowledge it again.
    ///
    /// [`StoreError::UnknownTask`] / [`StoreError::NotATarget`] mean the message can never be
    /// stored; the caller should acknowledge and drop it so the agent's outbox drains.
    pub fn record_result(
        &self,
        message_id: &str,
        task_id: TaskId,
        node_id: &UserId,
        body: &ResultBody,
    ) -> Result<Ingest, StoreError> {
        let one = NewResult {
            message_id,
            task_id,
            node_id,
            body,
        };
        self.record_results(std::slice::from_ref(&one))?
            .pop()
            .unwrap_or(Ok(Ingest::Duplicate))
    }

    /// [`Store::record_result`] for many results in one transaction: one fsync for a burst
    /// of results (a task fanned out to thousands of agents finishes in a burst). Returns
    /// one outcome per input, in order; an input that can never be stored (bad message id,
    /// unknown task, not a target, a transition the state machine refuses) gets its error
    /// and changes nothing, the others are stored. A storage error fails the whole call and
    /// changes nothing. When nothing is new the transaction is aborted (no fsync).
    pub fn record_results(
        &self,
        batch: &[NewResult<'_>],
    ) -> Result<Vec<Result<Ingest, StoreError>>, StoreError> {
        self.write_if_changed(|txn| {
            let mut out = Vec::with_capacity(batch.len());
            let mut changed = false;
            let mut results = txn.open_table(RESULTS)?;
            let mut by_task = txn.open_table(TASK_RESULTS)?;
            let mut t = TaskTables::open(txn)?;
            for r in batch {
                let outcome = ingest_one(&mut t, &mut results, &mut by_task, r)?;
                changed |= matches!(outcome, Ok(Ingest::New));
                out.push(outcome);
            }
            Ok((out, changed))
        })
    }

    /// Every stored result of a task (applied or not), ordered by node, then finish time.
    pub fn results_for(&self, task_id: TaskId) -> Result<Vec<StoredResult>, StoreError> {
        let txn = self.db.begin_read()?;
        let by_task = txn.open_table(TASK_RESULTS)?;
        let results = txn.open_table(RESULTS)?;
        let mut out = Vec::new();
        for item in by_task.range((task_id, "", "")..)? {
            let (k, _) = item?;
            let (t, node, message_id) = k.value();
            if t != task_id {
                break;
            }
            let v = results.get((node, message_id))?.ok_or_else(|| {
                StoreError::Corrupt(format!("result index names a missing result {message_id}"))
            })?;
            out.push(decode::<StoredResult>(v.value(), "result")?);
        }
        out.sort_by(|a, b| {
            (a.node_id.as_str(), a.body.finished_at_ms)
                .cmp(&(b.node_id.as_str(), b.body.finished_at_ms))
        });
        Ok(out)
    }

    /// Stores a status report from a registered agent, idempotently by (`node_id`,
    /// `message_id`), keeping only the newest [`StoreOptions::reports_per_agent`] reports
    /// per agent (in arrival order). A duplicate changes nothing and returns
    /// [`Ingest::Duplicate`].
    pub fn record_report(
        &self,
        message_id: &str,
        node_id: &UserId,
        metrics: &serde_json::Value,
        received_at_ms: u64,
    ) -> Result<Ingest, StoreError> {
        validate_message_id(message_id)?;
        let node = node_id.as_str();
        let txn = begin_durable_write(&self.db)?;
        {
            let mut ids = txn.open_table(REPORT_IDS)?;
            if ids.get((node, message_id))?.is_some() {
                drop(ids);
                txn.abort()?;
                return Ok(Ingest::Duplicate);
            }
            if txn.open_table(AGENTS)?.get(node)?.is_none() {
                return Err(StoreError::UnknownAgent(node_id.clone()));
            }
            let mut order = txn.open_table(REPORT_ID_ORDER)?;
            let last = match order.range((node, 0u64)..=(node, u64::MAX))?.next_back() {
                Some(item) => item?.0.value().1,
                None => 0,
            };
            let seq = last.checked_add(1).ok_or_else(|| {
                StoreError::Corrupt(format!("report sequence of {node} exhausted"))
            })?;
            let row = ReportRow {
                message_id: message_id.to_owned(),
                received_at_ms,
                metrics_json: metrics.to_string(),
            };
            let mut reports = txn.open_table(REPORTS)?;
            reports.insert((node, seq), encode(&row, "report")?.as_slice())?;
            ids.insert((node, message_id), seq)?;
            order.insert((node, seq), message_id)?;

            // Retention: reports first, then the (longer) window of remembered ids.
            if let Some(oldest_kept) = seq.checked_sub(self.options.reports_per_agent) {
                reports.retain_in((node, 0u64)..=(node, oldest_kept), |_, _| false)?;
            }
            if let Some(forget_to) = seq.checked_sub(self.options.report_ids_per_agent) {
                let mut forgotten = Vec::new();
                for item in order.extract_from_if((node, 0u64)..=(node, forget_to), |_, _| true)? {
                    let (_, v) = item?;
                    forgotten.push(v.value().to_owned());
                }
                for id in forgotten {
                    ids.remove((node, id.as_str()))?;
                }
            }
        }
        txn.commit()?;
        Ok(Ingest::New)
    }

    /// The retained reports of an agent, oldest first.
    pub fn reports(&self, node_id: &UserId) -> Result<Vec<Report>, StoreError> {
        let txn = self.db.begin_read()?;
        let reports = txn.open_table(REPORTS)?;
        let node = node_id.as_str();
        let mut out = Vec::new();
        for item in reports.range((node, 0u64)..=(node, u64::MAX))? {
            let (_, v) = item?;
            let row: ReportRow = decode(v.value(), "report")?;
            let metrics = serde_json::from_str(&row.metrics_json)
                .map_err(|e| StoreError::Corrupt(format!("report metrics: {e}")))?;
            out.push(Report {
                message_id: row.message_id,
                node_id: node_id.clone(),
                received_at_ms: row.received_at_ms,
                metrics,
            });
        }
        Ok(out)
    }

    /// Row counts of the main tables.
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(Counts {
            agents: txn.open_table(AGENTS)?.len()?,
            tasks: txn.open_table(TASKS)?.len()?,
            results: txn.open_table(RESULTS)?.len()?,
            reports: txn.open_table(REPORTS)?.len()?,
        })
    }
}

/// The task tables of one write transaction, with the index upkeep in one place.
struct TaskTables<'txn> {
    tasks: Table<'txn, u64, &'static [u8]>,
    targets: Table<'txn, (u64, &'static str), &'static [u8]>,
    pending: Table<'txn, (&'static str, u64), ()>,
    deadlines: Table<'txn, (u64, u64, &'static str), ()>,
}

impl<'txn> TaskTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(TaskTables {
            tasks: txn.open_table(TASKS)?,
            targets: txn.open_table(TARGETS)?,
            pending: txn.open_table(PENDING)?,
            deadlines: txn.open_table(DEADLINES)?,
        })
    }

    fn task_row(&self, task_id: TaskId) -> Result<TaskRow, StoreError> {
        read_task_row(&self.tasks, task_id)
    }

    fn target(&self, task_id: TaskId, node_id: &UserId) -> Result<TargetStatus, StoreError> {
        match self.targets.get((task_id, node_id.as_str()))? {
            Some(v) => decode(v.value(), "target"),
            None => Err(StoreError::NotATarget {
                task_id,
                node_id: node_id.clone(),
            }),
        }
    }

    fn targets_of(&self, task_id: TaskId) -> Result<Vec<(UserId, TargetStatus)>, StoreError> {
        read_targets(&self.targets, task_id)
    }

    /// Writes a target's new status and moves its index entries: a Pending target is in
    /// `pending`, an in-flight target with a deadline is in `deadlines`, nothing else is.
    fn put_target(
        &mut self,
        task_id: TaskId,
        node_id: &UserId,
        old: Option<&TargetStatus>,
        new: &TargetStatus,
    ) -> Result<(), StoreError> {
        let node = node_id.as_str();
        if let Some(old) = old {
            if old.state == TargetState::Pending {
                self.pending.remove((node, task_id))?;
            }
            if let (true, Some(d)) = (old.state.is_in_flight(), old.deadline_ms) {
                self.deadlines.remove((d, task_id, node))?;
            }
        }
        if new.state == TargetState::Pending {
            self.pending.insert((node, task_id), ())?;
        }
        if let (true, Some(d)) = (new.state.is_in_flight(), new.deadline_ms) {
            self.deadlines.insert((d, task_id, node), ())?;
        }
        self.targets
            .insert((task_id, node), encode(new, "target")?.as_slice())?;
        Ok(())
    }
}

/// [`Store::create_task`] inside a transaction (the spec already validated).
fn create_task_in(
    txn: &WriteTransaction,
    spec: &TaskSpec,
    created_at_ms: u64,
) -> Result<TaskId, StoreError> {
    let nodes = resolve_targets_in(txn, &spec.targets)?;

    let id = {
        let mut meta = txn.open_table(META)?;
        let id = meta
            .get(META_NEXT_TASK_ID)?
            .map(|v| v.value())
            .ok_or_else(|| StoreError::Corrupt("next_task_id is missing".to_owned()))?;
        let next = id.checked_add(1).ok_or(StoreError::TaskIdsExhausted)?;
        meta.insert(META_NEXT_TASK_ID, next)?;
        id
    };
    let mut t = TaskTables::open(txn)?;
    let row = TaskRow {
        spec: spec.clone(),
        created_at_ms,
    };
    t.tasks.insert(id, encode(&row, "task")?.as_slice())?;
    let status = TargetStatus {
        state: TargetState::Pending,
        attempts: 0,
        dispatched_at_ms: None,
        deadline_ms: None,
        updated_at_ms: created_at_ms,
        result: None,
    };
    for node in &nodes {
        t.put_target(id, node, None, &status)?;
    }
    Ok(id)
}

/// The registered agents `targets` names: every listed node (each must be registered) or
/// every agent whose labels match the selector. Tasks and config documents resolve their
/// targets the same way; an empty result is [`StoreError::NoTargets`].
fn resolve_targets_in(
    txn: &WriteTransaction,
    targets: &Targets,
) -> Result<BTreeSet<UserId>, StoreError> {
    let agents = txn.open_table(AGENTS)?;
    let nodes = match targets {
        Targets::Nodes(ids) => {
            for id in ids {
                if agents.get(id.as_str())?.is_none() {
                    return Err(StoreError::UnknownAgent(id.clone()));
                }
            }
            ids.iter().cloned().collect()
        }
        Targets::Selector(selector) => {
            let mut nodes = BTreeSet::new();
            for item in agents.iter()? {
                let (_, v) = item?;
                let rec: AgentRecord = decode(v.value(), "agent")?;
                if rec.matches(selector) {
                    nodes.insert(rec.node_id);
                }
            }
            nodes
        }
    };
    if nodes.is_empty() {
        return Err(StoreError::NoTargets);
    }
    Ok(nodes)
}

/// [`Store::cancel`] inside a transaction.
fn cancel_in(
    txn: &WriteTransaction,
    task_id: TaskId,
    at_ms: u64,
) -> Result<Vec<(UserId, TargetState)>, StoreError> {
    let mut t = TaskTables::open(txn)?;
    t.task_row(task_id)?;
    let live: Vec<(UserId, TargetStatus)> = t
        .targets_of(task_id)?
        .into_iter()
        .filter(|(_, s)| !s.state.is_terminal())
        .collect();
    let mut out = Vec::with_capacity(live.len());
    for (node, old) in live {
        let new = TargetStatus {
            state: TargetState::Cancelled,
            updated_at_ms: at_ms,
            ..old.clone()
        };
        t.put_target(task_id, &node, Some(&old), &new)?;
        out.push((node, old.state));
    }
    Ok(out)
}

/// Applies a heartbeat inside a transaction. `None`: unknown agent; `Some(None)`: seen, no
/// state change; `Some(Some((old, new)))`: the state changed.
#[allow(clippy::type_complexity)]
fn touch_in(
    agents: &mut Table<'_, &'static str, &'static [u8]>,
    node_id: &UserId,
    at_ms: u64,
    degraded: bool,
) -> Result<Option<Option<(AgentState, AgentState)>>, StoreError> {
    let mut rec: AgentRecord = match agents.get(node_id.as_str())? {
        Some(v) => decode(v.value(), "agent")?,
        None => return Ok(None),
    };
    if at_ms < rec.last_seen_ms {
        return Ok(Some(None));
    }
    let old = rec.state;
    rec.last_seen_ms = at_ms;
    rec.state = if degraded {
        AgentState::Degraded
    } else {
        AgentState::Online
    };
    agents.insert(node_id.as_str(), encode(&rec, "agent")?.as_slice())?;
    Ok(Some((old != rec.state).then_some((old, rec.state))))
}

fn read_task_row(
    tasks: &impl ReadableTable<u64, &'static [u8]>,
    task_id: TaskId,
) -> Result<TaskRow, StoreError> {
    match tasks.get(task_id)? {
        Some(v) => decode(v.value(), "task"),
        None => Err(StoreError::UnknownTask(task_id)),
    }
}

fn read_targets(
    targets: &impl ReadableTable<(u64, &'static str), &'static [u8]>,
    task_id: TaskId,
) -> Result<Vec<(UserId, TargetStatus)>, StoreError> {
    let mut out = Vec::new();
    for item in targets.range((task_id, "")..)? {
        let (k, v) = item?;
        let (t, node) = k.value();
        if t != task_id {
            break;
        }
        out.push((parse_node(node)?, decode(v.value(), "target")?));
    }
    Ok(out)
}

/// Stores one result inside a batch. The outer error is the storage failing (the batch is
/// lost); the inner one is this result being unusable, decided before anything is written.
fn ingest_one(
    t: &mut TaskTables<'_>,
    results: &mut Table<'_, (&'static str, &'static str), &'static [u8]>,
    by_task: &mut Table<'_, (u64, &'static str, &'static str), ()>,
    r: &NewResult<'_>,
) -> Result<Result<Ingest, StoreError>, StoreError> {
    if let Err(e) = validate_message_id(r.message_id) {
        return Ok(Err(e));
    }
    let node = r.node_id.as_str();
    if results.get((node, r.message_id))?.is_some() {
        return Ok(Ok(Ingest::Duplicate));
    }
    match t.task_row(r.task_id) {
        Ok(_) => {}
        Err(e @ StoreError::UnknownTask(_)) => return Ok(Err(e)),
        Err(e) => return Err(e),
    }
    let old = match t.target(r.task_id, r.node_id) {
        Ok(old) => old,
        Err(e @ StoreError::NotATarget { .. }) => return Ok(Err(e)),
        Err(e) => return Err(e),
    };
    let applied = old.state.is_in_flight();
    if applied {
        let to = if r.body.is_success() {
            TargetState::Succeeded
        } else {
            TargetState::Failed
        };
        if let Err(e) = check(r.task_id, r.node_id, old.state, to) {
            return Ok(Err(e));
        }
        let new = TargetStatus {
            state: to,
            updated_at_ms: r.body.finished_at_ms,
            result: Some(r.body.clone()),
            ..old.clone()
        };
        t.put_target(r.task_id, r.node_id, Some(&old), &new)?;
    }
    let stored = StoredResult {
        message_id: r.message_id.to_owned(),
        task_id: r.task_id,
        node_id: r.node_id.clone(),
        body: r.body.clone(),
        applied,
    };
    results.insert((node, r.message_id), encode(&stored, "result")?.as_slice())?;
    by_task.insert((r.task_id, node, r.message_id), ())?;
    Ok(Ok(Ingest::New))
}

fn check(
    task_id: TaskId,
    node_id: &UserId,
    from: TargetState,
    to: TargetState,
) -> Result<(), StoreError> {
    if from.can_transition_to(to) {
        Ok(())
    } else {
        Err(StoreError::InvalidTransition {
            task_id,
            node_id: node_id.clone(),
            from,
            to,
        })
    }
}

fn validate_spec(spec: &TaskSpec) -> Result<(), StoreError> {
    let bad = |m: &str| Err(StoreError::InvalidSpec(m.to_owned()));
    if spec.max_attempts == 0 {
        return bad("max_attempts must be at least 1");
    }
    if spec.timeout_ms == 0 {
        return bad("timeout_ms must be at least 1");
    }
    match &spec.kind {
        TaskKind::Command { argv, .. } if argv.first().is_none_or(|p| p.is_empty()) => {
            return bad("command argv must name a program");
        }
        TaskKind::TcpProbe { target, .. } if target.is_empty() => {
            return bad("tcp probe target is empty");
        }
        TaskKind::HttpProbe { url, .. } if url.is_empty() => {
            return bad("http probe url is empty");
        }
        _ => {}
    }
    match &spec.targets {
        Targets::Nodes(ids) if ids.is_empty() => bad("no target nodes given"),
        // An empty selector would silently mean "every agent".
        Targets::Selector(sel) if sel.is_empty() => bad("label selector is empty"),
        _ => Ok(()),
    }
}

fn validate_message_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN {
        Err(StoreError::InvalidMessageId)
    } else {
        Ok(())
    }
}

fn parse_node(s: &str) -> Result<UserId, StoreError> {
    UserId::new(s).map_err(|e| StoreError::Corrupt(format!("stored node id {s:?}: {e}")))
}

pub(crate) fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(value).map_err(|source| StoreError::Encode { what, source })
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A write transaction with durability set explicitly, so a change of redb's default can
/// never silently weaken the guarantee in the module docs.
pub(crate) fn begin_durable_write(db: &Database) -> Result<WriteTransaction, StoreError> {
    Ok(durable::begin_durable_write(db)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table_matches_the_documented_machine() {
        use TargetState::*;
        let all = [
            Pending, Dispatched, Running, Succeeded, Failed, TimedOut, Cancelled,
        ];
        let legal = [
            (Pending, Dispatched),
            (Pending, Cancelled),
            (Dispatched, Running),
            (Dispatched, Succeeded),
            (Dispatched, Failed),
            (Dispatched, TimedOut),
            (Dispatched, Cancelled),
            (Dispatched, Pending),
            (Running, Succeeded),
            (Running, Failed),
            (Running, TimedOut),
            (Running, Cancelled),
            (Running, Pending),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_transition_to(to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn success_rule() {
        let mut b = ResultBody {
            exit_code: Some(0),
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            error: None,
            latency_ms: None,
            finished_at_ms: 0,
            output_chunks: 0,
        };
        assert!(b.is_success());
        b.exit_code = None;
        assert!(b.is_success());
        b.exit_code = Some(2);
        assert!(!b.is_success());
        b.exit_code = None;
        b.error = Some("refused".into());
        assert!(!b.is_success());
    }
}
