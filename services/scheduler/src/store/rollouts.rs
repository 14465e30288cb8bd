//! Staged rollouts in the store (`scheduler_rollouts`, `scheduler_rollout_nodes`): a task
//! (a command or a probe), an agent upgrade or a config version applied to a fixed, ordered
//! target set in stages (pilot, gray, full), each cut into batches, with a failure threshold
//! per stage and operator controls. Each batch is an ordinary task or upgrade of the
//! batch's nodes, or, for a config version, a pin of the batch's nodes to that version
//! (`store::configs`: the other nodes keep the desired version until their batch comes).
//!
//! At creation the targets are resolved once and put in a stable pseudo-random order
//! (SHA-256 of rollout id and node id), so a pilot is a spread of the fleet rather than the
//! first node ids alphabetically, and a standby that takes over sees the same order. Stage
//! sizes are cumulative (`gray: 20%` means that after gray a fifth of the targets have it).
//!
//! Every step is **one** durable transaction together with its audit entry:
//! [`Store::step_rollout`] either finishes the batch in flight (all its targets terminal,
//! its deadline passed, or the stage's failures over the threshold) or starts the next
//! batch, creating the batch's task or upgrade in the same transaction that moves the
//! rollout past it. After a `kill -9` either the batch and its task are both on disk or neither is, so
//! the instance that takes over neither repeats nor skips a batch; the task's targets that
//! were never dispatched go out when the new active instance hears from their agents, as
//! for any task. The time rules live here as pure functions of `at_ms`; the loop that calls
//! them is [`crate::rollout`].

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::configs;
use super::operator::{append_in, create_once_in};
use super::upgrades;
use super::{
    AuditEntry, Created, META, NewAuditEntry, NewUpgrade, Store, StoreError, TargetState,
    TargetStatus, Targets, TaskId, TaskKind, TaskSpec, TaskTables, UpgradeRecord, UpgradeState,
    UserId, begin_durable_write, decode, encode, resolve_targets_in, validate_spec,
};

/// Rollouts: rollout id -> [`RolloutRecord`].
const ROLLOUTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("scheduler_rollouts");
/// Their resolved targets in rollout order: rollout id -> msgpack `Vec<UserId>`. Written
/// once, so the record rewritten at every step stays small for a 10,000-node rollout.
const ROLLOUT_NODES: TableDefinition<'_, u64, &[u8]> =
    TableDefinition::new("scheduler_rollout_nodes");
/// Rollouts that are not finished: rollout id -> (). The loop reads only these.
const ROLLOUTS_ACTIVE: TableDefinition<'_, u64, ()> =
    TableDefinition::new("scheduler_rollouts_active");
/// The id the next rollout gets (in the `scheduler_meta` table).
const META_NEXT_ROLLOUT_ID: &str = "next_rollout_id";

/// Stages per rollout at most.
pub const MAX_STAGES: usize = 10;
/// Outcomes of finished batches kept in the record (the newest).
pub const BATCH_HISTORY: usize = 200;

/// A rollout's id: from 1, never reused in one file.
pub type RolloutId = u64;

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(ROLLOUTS)?;
    txn.open_table(ROLLOUT_NODES)?;
    txn.open_table(ROLLOUTS_ACTIVE)?;
    Ok(())
}

/// A size as an operator gives it: a count of nodes or a percentage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    /// This many nodes.
    Count(u64),
    /// This percentage (1..=100), rounded up, at least one node.
    Percent(u8),
}

impl Size {
    /// Nodes out of `of`.
    pub fn of(self, of: u64) -> u64 {
        match self {
            Size::Count(n) => n.min(of),
            Size::Percent(p) => {
                let p = u64::from(p.min(100));
                (of.saturating_mul(p).div_ceil(100)).max(u64::from(p > 0).min(of))
            }
        }
    }

    /// Parses `"25"` (a count) or `"10%"`.
    pub fn parse(s: &str) -> Result<Size, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Size::Percent(p)),
                _ => Err(format!("{s:?}: a percentage is 1% to 100%")),
            }
        } else {
            match s.parse::<u64>() {
                Ok(n @ 1..) => Ok(Size::Count(n)),
                _ => Err(format!(
                    "{s:?}: a size is a count (1 or more) or a percentage"
                )),
            }
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Count(n) => write!(f, "{n}"),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A stage as requested: its name and its cumulative size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    /// `pilot`, `gray`, `full`, or any short name.
    pub name: String,
    /// Targets covered once this stage is done (cumulative).
    pub size: Size,
}

/// The default plan, from seed 000: pilot 1%, gray 20%, full.
pub fn default_stages() -> Vec<StagePlan> {
    vec![
        StagePlan {
            name: "pilot".to_owned(),
            size: Size::Percent(1),
        },
        StagePlan {
            name: "gray".to_owned(),
            size: Size::Percent(20),
        },
        StagePlan {
            name: "full".to_owned(),
            size: Size::Percent(100),
        },
    ]
}

/// A batch's task: the same command or probe on the batch's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutTask {
    /// The task kind.
    pub kind: TaskKind,
    /// Scheduler-side deadline of one attempt (as [`TaskSpec::timeout_ms`]).
    pub timeout_ms: u64,
    /// Attempts per target.
    pub max_attempts: u32,
}

/// A batch's agent upgrade: the same artifact to the batch's nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutUpgrade {
    /// The artifact (uploaded before the rollout starts).
    pub sha256: String,
    /// The version the new binary reports.
    pub version: String,
    /// How long each agent's new binary gets to come online, ms.
    pub deadline_ms: u64,
    /// Platform restriction.
    pub os: Option<String>,
    /// Architecture restriction.
    pub arch: Option<String>,
}

/// A batch's config version: the batch's nodes move to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutConfig {
    /// The document.
    pub name: String,
    /// A kept version (usually staged with `activate: false`).
    pub version: u64,
}

/// What every batch applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    /// A task (a command or a probe); a target succeeds when its task does.
    Task(RolloutTask),
    /// An agent upgrade; a target succeeds when it is back online with the new version,
    /// fails when its upgrade failed or was rolled back.
    Upgrade(RolloutUpgrade),
    /// A config version; a target succeeds when it acks the version as applied, fails
    /// when it acks a failure.
    Config(RolloutConfig),
}

/// What applies a batch: its task or its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// A task id.
    Task(TaskId),
    /// An upgrade id.
    Upgrade(u64),
    /// The config version the batch's nodes were pinned to.
    Config(u64),
}

/// A rollout as an operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRollout {
    /// What every batch applies.
    pub action: RolloutAction,
    /// Where: resolved once, at creation.
    pub targets: Targets,
    /// Cumulative stages, non-decreasing; empty means [`default_stages`].
    pub stages: Vec<StagePlan>,
    /// Batch size within a stage (of the stage's nodes); `None` is the whole stage.
    pub batch: Option<Size>,
    /// Wait between batches, ms.
    pub pause_ms: u64,
    /// Failures a stage tolerates, in percent of the stage's nodes (0 = none).
    pub max_failure_percent: u8,
    /// How long a batch may take; targets not finished by then count as failures.
    pub batch_timeout_ms: u64,
    /// Go on to the next stage without an operator's promote.
    pub auto_promote: bool,
    /// The API key that created it.
    pub created_by: String,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Batches go out.
    Running,
    /// An operator paused it: the batch in flight finishes, no new one starts.
    Paused,
    /// A stage is done; the next starts on an operator's promote.
    AwaitingPromotion,
    /// A stage passed its failure threshold; resume (accepting the failures) or abort.
    Halted,
    /// Stopped for good by an operator.
    Aborted,
    /// Every stage is done.
    Completed,
}

impl RolloutState {
    /// Whether nothing will ever happen to it again.
    pub fn is_terminal(self) -> bool {
        matches!(self, RolloutState::Aborted | RolloutState::Completed)
    }
}

/// A stage as resolved at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Its name.
    pub name: String,
    /// As requested.
    pub size: Size,
    /// First node index (into the rollout's node order).
    pub start: u64,
    /// One past the last node index.
    pub end: u64,
    /// Nodes per batch.
    pub batch: u64,
    /// Failures it tolerates.
    pub allowed_failures: u64,
    /// When its first batch started, unix ms.
    pub started_at_ms: Option<u64>,
    /// When its last batch finished, unix ms.
    pub finished_at_ms: Option<u64>,
    /// Targets that succeeded.
    pub succeeded: u64,
    /// Targets that failed, timed out, or did not finish in time.
    pub failed: u64,
}

/// The batch being applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// Batch number in the rollout, from 0.
    pub index: u64,
    /// Node index range.
    pub start: u64,
    /// One past the last node.
    pub end: u64,
    /// The task or upgrade that applies it.
    pub work: Work,
    /// When it started, unix ms.
    pub started_at_ms: u64,
    /// When unfinished targets count as failed, unix ms.
    pub deadline_ms: u64,
}

/// A finished batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    /// Batch number.
    pub index: u64,
    /// Stage index.
    pub stage: usize,
    /// Nodes in it.
    pub nodes: u64,
    /// Its task or upgrade.
    pub work: Work,
    /// Targets that succeeded.
    pub succeeded: u64,
    /// Targets that failed or timed out.
    pub failed: u64,
    /// Targets not finished when the batch was closed (deadline or halt); counted as failed.
    pub unfinished: u64,
    /// Start, unix ms.
    pub started_at_ms: u64,
    /// End, unix ms.
    pub finished_at_ms: u64,
}

/// A stored rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The id.
    pub id: RolloutId,
    /// What every batch applies.
    pub action: RolloutAction,
    /// The targets as requested.
    pub targets: Targets,
    /// Resolved targets.
    pub total: u64,
    /// The stages.
    pub stages: Vec<Stage>,
    /// Wait between batches, ms.
    pub pause_ms: u64,
    /// Per-stage failure threshold, percent.
    pub max_failure_percent: u8,
    /// Batch deadline, ms.
    pub batch_timeout_ms: u64,
    /// Promote between stages without an operator.
    pub auto_promote: bool,
    /// State.
    pub state: RolloutState,
    /// Why it halted, was aborted or paused (the last such reason).
    pub reason: Option<String>,
    /// The current stage.
    pub stage: usize,
    /// Nodes before this index have had their batch started.
    pub next: u64,
    /// The batch in flight.
    pub batch: Option<InFlight>,
    /// Batches started so far.
    pub batches_started: u64,
    /// The newest finished batches (at most [`BATCH_HISTORY`]).
    pub history: Vec<BatchOutcome>,
    /// Failures of the current stage an operator accepted by resuming after a halt.
    pub accepted_failures: u64,
    /// No batch starts before this time, unix ms (the pause after the previous one).
    pub not_before_ms: u64,
    /// Creation, unix ms.
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// Last change, unix ms.
    pub updated_at_ms: u64,
}

impl RolloutRecord {
    /// Targets done (succeeded or failed) over all stages.
    pub fn done(&self) -> (u64, u64) {
        self.stages
            .iter()
            .fold((0, 0), |(s, f), st| (s + st.succeeded, f + st.failed))
    }
}

/// An operator's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Running -> Paused.
    Pause,
    /// Paused or Halted -> Running (a halted stage's failures so far are accepted).
    Resume,
    /// AwaitingPromotion -> Running on the next stage.
    Promote,
    /// Any non-terminal state -> Aborted; the batch in flight is cancelled.
    Abort,
}

impl Control {
    /// Its name in the API and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Promote => "promote",
            Control::Abort => "abort",
        }
    }
}

/// What one [`Store::step_rollout`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing was due.
    Idle,
    /// A batch started: send its work to these nodes.
    Started {
        /// The batch's task or upgrade.
        work: StartedWork,
        /// Its nodes.
        nodes: Vec<UserId>,
    },
    /// The batch in flight finished; the rollout is now in `state`.
    Finished {
        /// The outcome.
        outcome: BatchOutcome,
        /// The rollout's state after it.
        state: RolloutState,
        /// Targets of the batch that were still in flight and were cancelled (tell them).
        cancelled: Vec<UserId>,
    },
    /// A batch could not start (its nodes are no longer registered, say): halted.
    Halted(String),
    /// Nothing was left to start (the stages after a promote were empty): completed.
    Completed,
}

/// The work of a batch that started, as its dispatch needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartedWork {
    /// Dispatch this task.
    Task {
        /// Its id.
        task_id: TaskId,
        /// Its spec.
        spec: TaskSpec,
    },
    /// Push this upgrade's manifest.
    Upgrade(UpgradeRecord),
    /// Push this config version.
    Config(configs::ConfigVersion),
}

/// What [`Store::control_rollout`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controlled {
    /// The record after the change.
    pub record: RolloutRecord,
    /// Task and in-flight targets cancelled by an abort (tell their agents).
    pub cancelled: Option<(TaskId, Vec<UserId>)>,
}

/// Resolves the stages of a rollout over `total` nodes: cumulative ends, batch sizes and
/// thresholds. Empty stages (a pilot of 1% of 3 nodes still has one) are kept with zero
/// nodes and skipped when running.
pub fn plan_stages(
    plans: &[StagePlan],
    total: u64,
    batch: Option<Size>,
    max_failure_percent: u8,
) -> Result<Vec<Stage>, String> {
    if plans.len() > MAX_STAGES {
        return Err(format!("at most {MAX_STAGES} stages"));
    }
    if max_failure_percent > 100 {
        return Err("max_failure_percent is 0 to 100".to_owned());
    }
    let mut stages = Vec::with_capacity(plans.len());
    let mut start = 0;
    for plan in plans {
        let name = plan.name.trim();
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "stage name {:?}: 1 to 32 of A-Z a-z 0-9 - _",
                plan.name
            ));
        }
        let end = plan.size.of(total);
        if end < start {
            return Err(format!(
                "stage {name:?} ({}) is smaller than the stage before it; sizes are cumulative",
                plan.size
            ));
        }
        let len = end - start;
        let per_batch = batch.map_or(len, |b| b.of(len)).max(1);
        stages.push(Stage {
            name: name.to_owned(),
            size: plan.size,
            start,
            end,
            batch: per_batch,
            allowed_failures: len.saturating_mul(u64::from(max_failure_percent)) / 100,
            started_at_ms: None,
            finished_at_ms: None,
            succeeded: 0,
            failed: 0,
        });
        start = end;
    }
    if stages.is_empty() {
        return Err("a rollout needs at least one stage".to_owned());
    }
    Ok(stages)
}

/// The rollout order of `nodes`: by SHA-256 of the rollout id and the node id.
pub fn rollout_order(id: RolloutId, nodes: impl IntoIterator<Item = UserId>) -> Vec<UserId> {
    let mut keyed: Vec<([u8; 32], UserId)> = nodes
        .into_iter()
        .map(|n| {
            let mut h = Sha256::new();
            h.update(id.to_be_bytes());
            h.update(n.as_str().as_bytes());
            (h.finalize().into(), n)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, n)| n).collect()
}

/// The nodes of a rollout from position `start` to `end` (exclusive), in rollout order.
fn nodes_between(
    txn: &WriteTransaction,
    id: RolloutId,
    start: u64,
    end: u64,
) -> Result<Vec<UserId>, StoreError> {
    let order: Vec<UserId> = {
        let table = txn.open_table(ROLLOUT_NODES)?;
        match table.get(id)? {
            Some(v) => decode(v.value(), "rollout nodes")?,
            None => return Err(StoreError::UnknownRollout(id)),
        }
    };
    Ok(order
        .get(usize::try_from(start).unwrap_or(usize::MAX)..usize::try_from(end).unwrap_or(0))
        .map(<[UserId]>::to_vec)
        .unwrap_or_default())
}

/// The document a config rollout applies.
fn config_name(record: &RolloutRecord) -> Result<&str, StoreError> {
    match &record.action {
        RolloutAction::Config(c) => Ok(&c.name),
        _ => Err(StoreError::Corrupt(format!(
            "rollout {} has config work but no config action",
            record.id
        ))),
    }
}

/// Counts of a batch's targets: (succeeded, failed, unfinished).
fn tally_work(
    txn: &WriteTransaction,
    record: &RolloutRecord,
    batch: &InFlight,
) -> Result<(u64, u64, u64), StoreError> {
    Ok(match batch.work {
        Work::Config(version) => {
            let nodes = nodes_between(txn, record.id, batch.start, batch.end)?;
            configs::tally_in(txn, config_name(record)?, version, &nodes)?
        }
        Work::Task(task_id) => tally(&TaskTables::open(txn)?.targets_of(task_id)?),
        Work::Upgrade(id) => {
            let mut out = (0, 0, 0);
            for (_, state) in upgrades::node_states_in(txn, id)? {
                match state {
                    UpgradeState::Online => out.0 += 1,
                    UpgradeState::Failed | UpgradeState::RolledBack => out.1 += 1,
                    UpgradeState::Pending | UpgradeState::Downloading | UpgradeState::Installed => {
                        out.2 += 1;
                    }
                }
            }
            out
        }
    })
}

/// Stops what is left of a batch's work: a task's unfinished targets are cancelled (the
/// in-flight ones returned, so their agents are told); an upgrade's targets that never
/// heard of it end `failed` with `reason` (those downloading or installing go on: the
/// agent's watchdog decides); a config batch's nodes that do not run the version go back
/// to the desired one.
fn stop_work(
    txn: &WriteTransaction,
    record: &RolloutRecord,
    batch: &InFlight,
    reason: &str,
    at_ms: u64,
) -> Result<Vec<UserId>, StoreError> {
    match batch.work {
        Work::Config(version) => {
            let nodes = nodes_between(txn, record.id, batch.start, batch.end)?;
            configs::unpin_unfinished_in(txn, config_name(record)?, version, &nodes)?;
            Ok(Vec::new())
        }
        Work::Task(task_id) => {
            let mut t = TaskTables::open(txn)?;
            let mut told = Vec::new();
            for (node, old) in t.targets_of(task_id)? {
                if old.state.is_terminal() {
                    continue;
                }
                if old.state.is_in_flight() {
                    told.push(node.clone());
                }
                let new = TargetStatus {
                    state: TargetState::Cancelled,
                    updated_at_ms: at_ms,
                    ..old.clone()
                };
                t.put_target(task_id, &node, Some(&old), &new)?;
            }
            Ok(told)
        }
        Work::Upgrade(id) => {
            upgrades::fail_pending_in(txn, id, reason, at_ms)?;
            Ok(Vec::new())
        }
    }
}

/// Counts of a task's targets: (succeeded, failed, unfinished).
fn tally(targets: &[(UserId, TargetStatus)]) -> (u64, u64, u64) {
    let mut out = (0, 0, 0);
    for (_, s) in targets {
        match s.state {
            TargetState::Succeeded => out.0 += 1,
            TargetState::Failed | TargetState::TimedOut | TargetState::Cancelled => out.1 += 1,
            TargetState::Pending | TargetState::Dispatched | TargetState::Running => out.2 += 1,
        }
    }
    out
}

impl Store {
    /// Resolves the targets, plans the stages and stores a new rollout (Running, its first
    /// batch due at once) with its audit entry, in one transaction.
    pub fn create_rollout(
        &self,
        new: &NewRollout,
        at_ms: u64,
        audit: impl FnOnce(&RolloutRecord) -> NewAuditEntry,
    ) -> Result<(RolloutRecord, AuditEntry), StoreError> {
        match &new.action {
            RolloutAction::Task(task) => validate_spec(&TaskSpec {
                kind: task.kind.clone(),
                targets: new.targets.clone(),
                timeout_ms: task.timeout_ms,
                max_attempts: task.max_attempts,
                traceparent: None,
            })?,
            RolloutAction::Upgrade(u) => upgrades::check_new(&new_upgrade(u, &new.targets, ""))
                .map_err(|e| StoreError::InvalidRollout(e.to_string()))?,
            RolloutAction::Config(_) => {}
        }
        if new.batch_timeout_ms == 0 {
            return Err(StoreError::InvalidRollout(
                "batch_timeout_ms must be at least 1".to_owned(),
            ));
        }
        self.write(|txn| {
            if let RolloutAction::Upgrade(u) = &new.action
                && !upgrades::artifact_exists_in(txn, &u.sha256)?
            {
                return Err(StoreError::UnknownArtifact(u.sha256.clone()));
            }
            if let RolloutAction::Config(c) = &new.action {
                configs::check_rollout_in(txn, &c.name, c.version)?;
            }
            let nodes = resolve_targets_in(txn, &new.targets)?;
            let id = {
                let mut meta = txn.open_table(META)?;
                let id = meta.get(META_NEXT_ROLLOUT_ID)?.map_or(1, |v| v.value());
                let next = id
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Corrupt("rollout ids exhausted".to_owned()))?;
                meta.insert(META_NEXT_ROLLOUT_ID, next)?;
                id
            };
            let order = rollout_order(id, nodes);
            let total = order.len() as u64;
            let plans = if new.stages.is_empty() {
                default_stages()
            } else {
                new.stages.clone()
            };
            let stages = plan_stages(&plans, total, new.batch, new.max_failure_percent)
                .map_err(StoreError::InvalidRollout)?;
            let record = RolloutRecord {
                id,
                action: new.action.clone(),
                targets: new.targets.clone(),
                total,
                stages,
                pause_ms: new.pause_ms,
                max_failure_percent: new.max_failure_percent,
                batch_timeout_ms: new.batch_timeout_ms,
                auto_promote: new.auto_promote,
                state: RolloutState::Running,
                reason: None,
                stage: 0,
                next: 0,
                batch: None,
                batches_started: 0,
                history: Vec::new(),
                accepted_failures: 0,
                not_before_ms: at_ms,
                created_at_ms: at_ms,
                created_by: new.created_by.clone(),
                updated_at_ms: at_ms,
            };
            txn.open_table(ROLLOUT_NODES)?
                .insert(id, encode(&order, "rollout nodes")?.as_slice())?;
            put(txn, &record)?;
            let entry = append_in(txn, at_ms, audit(&record))?;
            Ok((record, entry))
        })
    }

    /// Every rollout, by id.
    pub fn rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            out.push(decode(v.value(), "rollout")?);
        }
        Ok(out)
    }

    /// The ids of rollouts that are not finished.
    pub fn active_rollouts(&self) -> Result<Vec<RolloutId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUTS_ACTIVE)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, _) = item?;
            out.push(k.value());
        }
        Ok(out)
    }

    /// One rollout.
    pub fn rollout(&self, id: RolloutId) -> Result<Option<RolloutRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUTS)?;
        match table.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "rollout")?)),
            None => Ok(None),
        }
    }

    /// A rollout's targets in rollout order.
    pub fn rollout_nodes(&self, id: RolloutId) -> Result<Vec<UserId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROLLOUT_NODES)?;
        match table.get(id)? {
            Some(v) => decode(v.value(), "rollout nodes"),
            None => Err(StoreError::UnknownRollout(id)),
        }
    }

    /// Does what is due for rollout `id` at `at_ms` (see the module docs), in one durable
    /// transaction with the audit entry `audit` makes of it; a step with nothing due writes
    /// nothing and costs no fsync.
    pub fn step_rollout(
        &self,
        id: RolloutId,
        at_ms: u64,
        audit: impl FnOnce(&RolloutRecord, &Step) -> NewAuditEntry,
    ) -> Result<(Step, Option<AuditEntry>), StoreError> {
        let txn = begin_durable_write(&self.db)?;
        let Some(mut record) = get(&txn, id)? else {
            txn.abort()?;
            return Ok((Step::Idle, None));
        };
        let step = if record.batch.is_some() {
            finish_batch_in(&txn, &mut record, at_ms)?
        } else {
            start_batch_in(&txn, &mut record, at_ms)?
        };
        if step == Step::Idle {
            txn.abort()?;
            return Ok((Step::Idle, None));
        }
        if record.state == RolloutState::Completed
            && let RolloutAction::Config(c) = &record.action
        {
            let covered = nodes_between(&txn, record.id, 0, record.total)?
                .into_iter()
                .collect();
            configs::complete_in(&txn, &c.name, c.version, &covered, at_ms)?;
        }
        record.updated_at_ms = at_ms;
        put(&txn, &record)?;
        let entry = append_in(&txn, at_ms, audit(&record, &step))?;
        txn.commit()?;
        Ok((step, Some(entry)))
    }

    /// Applies an operator's control, with its audit entry, in one transaction.
    /// [`StoreError::RolloutConflict`] when the rollout's state does not allow it.
    pub fn control_rollout(
        &self,
        id: RolloutId,
        control: Control,
        at_ms: u64,
        audit: impl FnOnce(&RolloutRecord) -> NewAuditEntry,
    ) -> Result<(Controlled, AuditEntry), StoreError> {
        self.write(|txn| {
            let mut record = get(txn, id)?.ok_or(StoreError::UnknownRollout(id))?;
            let conflict = |record: &RolloutRecord| StoreError::RolloutConflict {
                id,
                control: control.name(),
                state: record.state,
            };
            let mut cancelled = None;
            match (control, record.state) {
                (Control::Pause, RolloutState::Running) => {
                    record.state = RolloutState::Paused;
                    record.reason = Some("paused by an operator".to_owned());
                }
                (Control::Resume, RolloutState::Paused) => {
                    record.state = RolloutState::Running;
                    record.reason = None;
                }
                (Control::Resume, RolloutState::Halted) => {
                    // The operator looked at the failures and goes on: they (also those of
                    // the batch still in flight) no longer count against the threshold.
                    let mut failed = record.stages.get(record.stage).map_or(0, |s| s.failed);
                    if let Some(batch) = &record.batch {
                        failed += tally_work(txn, &record, batch)?.1;
                    }
                    record.accepted_failures = failed;
                    record.state = RolloutState::Running;
                    record.reason = None;
                }
                (Control::Promote, RolloutState::AwaitingPromotion) => {
                    record.stage += 1;
                    record.accepted_failures = 0;
                    record.state = RolloutState::Running;
                    record.reason = None;
                    record.not_before_ms = at_ms;
                }
                (Control::Abort, state) if !state.is_terminal() => {
                    if let Some(batch) = record.batch.take() {
                        let counts = tally_work(txn, &record, &batch)?;
                        let told = stop_work(txn, &record, &batch, "rollout aborted", at_ms)?;
                        record_outcome(&mut record, &batch, counts, at_ms);
                        if let Work::Task(task_id) = batch.work {
                            cancelled = Some((task_id, told));
                        }
                    }
                    record.state = RolloutState::Aborted;
                    record.reason = Some("aborted by an operator".to_owned());
                }
                _ => return Err(conflict(&record)),
            }
            record.updated_at_ms = at_ms;
            put(txn, &record)?;
            let entry = append_in(txn, at_ms, audit(&record))?;
            Ok((Controlled { record, cancelled }, entry))
        })
    }
}

/// Adds a finished batch to its stage and the history.
fn record_outcome(
    record: &mut RolloutRecord,
    batch: &InFlight,
    (succeeded, failed, unfinished): (u64, u64, u64),
    at_ms: u64,
) -> BatchOutcome {
    let stage_index = record.stage;
    if let Some(stage) = record.stages.get_mut(stage_index) {
        stage.succeeded += succeeded;
        stage.failed += failed + unfinished;
        stage.finished_at_ms = Some(at_ms);
    }
    let outcome = BatchOutcome {
        index: batch.index,
        stage: stage_index,
        nodes: batch.end - batch.start,
        work: batch.work,
        succeeded,
        failed,
        unfinished,
        started_at_ms: batch.started_at_ms,
        finished_at_ms: at_ms,
    };
    record.history.push(outcome.clone());
    if record.history.len() > BATCH_HISTORY {
        let excess = record.history.len() - BATCH_HISTORY;
        record.history.drain(..excess);
    }
    outcome
}

/// The reason a stage halts.
fn halt_reason(record: &RolloutRecord, stage: &Stage, failed: u64) -> String {
    format!(
        "stage {:?}: {} of {} targets failed (threshold {}%, {} tolerated)",
        stage.name,
        failed,
        stage.end - stage.start,
        record.max_failure_percent,
        stage.allowed_failures
    )
}

/// Closes the batch in flight when every target is done or its deadline passed, and
/// decides the rollout's next state. A stage that goes over its failure threshold while
/// the batch runs halts at once (no new batch starts); the batch in flight still finishes
/// and is counted, so a resume never skips or repeats one of its targets.
fn finish_batch_in(
    txn: &WriteTransaction,
    record: &mut RolloutRecord,
    at_ms: u64,
) -> Result<Step, StoreError> {
    let Some(batch) = record.batch.clone() else {
        return Ok(Step::Idle);
    };
    let (succeeded, failed, unfinished) = tally_work(txn, record, &batch)?;
    let stage = record
        .stages
        .get(record.stage)
        .ok_or_else(|| StoreError::Corrupt(format!("rollout {} has no stage", record.id)))?
        .clone();
    if unfinished > 0 && at_ms < batch.deadline_ms {
        let stage_failed = (stage.failed + failed).saturating_sub(record.accepted_failures);
        if stage_failed > stage.allowed_failures && record.state != RolloutState::Halted {
            let reason = halt_reason(record, &stage, stage_failed);
            record.state = RolloutState::Halted;
            record.reason = Some(reason.clone());
            return Ok(Step::Halted(reason));
        }
        return Ok(Step::Idle);
    }
    // Past the deadline: the targets not finished will not be waited for. Those still
    // waiting for their agent are cancelled (they never started); in-flight ones are
    // cancelled too and their agents told, so that a closed batch does not keep running
    // behind the rollout's back. They count as failed: their agents did not come back.
    let cancelled = if unfinished > 0 {
        stop_work(
            txn,
            record,
            &batch,
            "not online by the rollout batch's deadline",
            at_ms,
        )?
    } else {
        Vec::new()
    };
    record.batch = None;
    let outcome = record_outcome(record, &batch, (succeeded, failed, unfinished), at_ms);
    let stage = record.stages[record.stage].clone();
    let stage_failed = stage.failed.saturating_sub(record.accepted_failures);
    if stage_failed > stage.allowed_failures {
        record.state = RolloutState::Halted;
        record.reason = Some(halt_reason(record, &stage, stage_failed));
    } else if record.state != RolloutState::Halted && record.next >= stage.end {
        advance_stage(record);
    }
    record.not_before_ms = at_ms.saturating_add(record.pause_ms);
    Ok(Step::Finished {
        outcome,
        state: record.state,
        cancelled,
    })
}

/// After a stage's last batch: the next non-empty stage (at once with `auto_promote`,
/// otherwise after an operator's promote), or completion.
fn advance_stage(record: &mut RolloutRecord) {
    let next = (record.stage + 1..record.stages.len()).find(|&i| {
        let s = &record.stages[i];
        s.end > s.start
    });
    match next {
        None => {
            record.state = RolloutState::Completed;
            record.reason = None;
        }
        Some(i) if record.auto_promote => {
            record.stage = i;
            record.accepted_failures = 0;
        }
        // Promote moves to the next stage; empty ones are skipped when a batch starts.
        Some(_) => record.state = RolloutState::AwaitingPromotion,
    }
}

/// Starts the next batch if the rollout is running and its pause has passed.
fn start_batch_in(
    txn: &WriteTransaction,
    record: &mut RolloutRecord,
    at_ms: u64,
) -> Result<Step, StoreError> {
    if record.state != RolloutState::Running || at_ms < record.not_before_ms {
        return Ok(Step::Idle);
    }
    // Skip empty stages (and the one just promoted into, if it is empty).
    while let Some(stage) = record.stages.get(record.stage) {
        if record.next < stage.end {
            break;
        }
        if record.stage + 1 >= record.stages.len() {
            record.state = RolloutState::Completed;
            record.reason = None;
            return Ok(Step::Completed);
        }
        record.stage += 1;
        record.accepted_failures = 0;
    }
    let Some(stage) = record.stages.get_mut(record.stage) else {
        return Ok(Step::Idle);
    };
    let start = record.next.max(stage.start);
    let end = start.saturating_add(stage.batch).min(stage.end);
    stage.started_at_ms.get_or_insert(at_ms);
    let nodes = nodes_between(txn, record.id, start, end)?;
    let created = match &record.action {
        RolloutAction::Task(task) => {
            let spec = TaskSpec {
                kind: task.kind.clone(),
                targets: Targets::Nodes(nodes.clone()),
                timeout_ms: task.timeout_ms,
                max_attempts: task.max_attempts,
                traceparent: None,
            };
            create_once_in(txn, &spec, at_ms, None).map(|created| match created {
                Created::New(task_id) | Created::Replayed(task_id) => {
                    (Work::Task(task_id), StartedWork::Task { task_id, spec })
                }
            })
        }
        RolloutAction::Upgrade(u) => {
            let new = new_upgrade(
                u,
                &Targets::Nodes(nodes.clone()),
                &format!("rollout/{}", record.id),
            );
            upgrades::create_upgrade_in(txn, &new, at_ms)
                .map(|(upgrade, _)| (Work::Upgrade(upgrade.id), StartedWork::Upgrade(upgrade)))
        }
        RolloutAction::Config(c) => configs::pin_in(txn, &c.name, c.version, &nodes)
            .map(|version| (Work::Config(c.version), StartedWork::Config(version))),
    };
    let (work, started) = match created {
        Ok(created) => created,
        // A node was removed from the registry since the rollout was planned: stop and let
        // an operator decide rather than silently shrinking the batch.
        Err(
            e @ (StoreError::UnknownAgent(_)
            | StoreError::NoTargets
            | StoreError::UnknownArtifact(_)
            | StoreError::UnknownConfigVersion { .. }),
        ) => {
            record.state = RolloutState::Halted;
            let reason = format!("batch {} could not start: {e}", record.batches_started);
            record.reason = Some(reason.clone());
            return Ok(Step::Halted(reason));
        }
        Err(e) => return Err(e),
    };
    record.batch = Some(InFlight {
        index: record.batches_started,
        start,
        end,
        work,
        started_at_ms: at_ms,
        deadline_ms: at_ms.saturating_add(record.batch_timeout_ms),
    });
    record.batches_started += 1;
    record.next = end;
    Ok(Step::Started {
        work: started,
        nodes,
    })
}

/// The upgrade a rollout's batch creates for `targets`.
fn new_upgrade(u: &RolloutUpgrade, targets: &Targets, actor: &str) -> NewUpgrade {
    NewUpgrade {
        sha256: u.sha256.clone(),
        version: u.version.clone(),
        deadline_ms: u.deadline_ms,
        os: u.os.clone(),
        arch: u.arch.clone(),
        targets: targets.clone(),
        actor: actor.to_owned(),
    }
}

fn get(txn: &WriteTransaction, id: RolloutId) -> Result<Option<RolloutRecord>, StoreError> {
    let table = txn.open_table(ROLLOUTS)?;
    let value = table.get(id)?;
    match value {
        Some(v) => Ok(Some(decode(v.value(), "rollout")?)),
        None => Ok(None),
    }
}

fn put(txn: &WriteTransaction, record: &RolloutRecord) -> Result<(), StoreError> {
    txn.open_table(ROLLOUTS)?
        .insert(record.id, encode(record, "rollout")?.as_slice())?;
    let mut active = txn.open_table(ROLLOUTS_ACTIVE)?;
    if record.state.is_terminal() {
        active.remove(record.id)?;
    } else {
        active.insert(record.id, ())?;
    }
    Ok(())
}

/// The unfinished rollout of config `name`, if there is one.
pub(super) fn active_config_rollout_in(
    txn: &WriteTransaction,
    name: &str,
) -> Result<Option<RolloutId>, StoreError> {
    let ids: Vec<RolloutId> = txn
        .open_table(ROLLOUTS_ACTIVE)?
        .iter()?
        .map(|item| item.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()?;
    for id in ids {
        if let Some(record) = get(txn, id)?
            && matches!(&record.action, RolloutAction::Config(c) if c.name == name)
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}
