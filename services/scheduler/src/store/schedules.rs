//! Schedules in the store: recurring tasks from cron expressions (the `scheduler_schedules`
//! table), and the one operation that fires a schedule for a period.
//!
//! A schedule keeps `since_secs`, the last period it has dealt with (fired, skipped because
//! the previous run was unfinished, or failed to resolve targets), or the time it was
//! created or resumed. [`Store::fire_schedule`] moves it forward and creates the task in
//! **one** durable transaction, together with an idempotency key
//! `schedule:<id>:<period>` (the actor [`SCHEDULE_ACTOR`]) and the `schedule.fire` audit
//! entry: after a crash either all of it is on disk or none of it, so the instance that
//! takes over sees the period as done and cannot fire it again, and if it ever evaluated
//! the same period anyway the idempotency key would hand back the task that exists. The
//! time rules (which period is due) live in [`crate::schedule`]; this module never reads
//! the clock.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::operator::{append_in, create_once_in};
use super::{
    AuditEntry, Created, IdempotencyClaim, META, NewAuditEntry, Store, StoreError, TARGETS, TaskId,
    TaskSpec, begin_durable_write, decode, encode, read_targets, validate_spec,
};
use redb::ReadableDatabase;

/// Schedules: schedule id -> [`ScheduleRecord`].
const SCHEDULES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("scheduler_schedules");
/// The id the next schedule gets (in the `scheduler_meta` table).
const META_NEXT_SCHEDULE_ID: &str = "next_schedule_id";

/// The idempotency "API key name" under which schedules create their tasks. The `:` makes
/// it a name no API key can have (names are `A-Z a-z 0-9 _ . -`), so no caller's
/// `Idempotency-Key` can collide with a schedule's.
pub const SCHEDULE_ACTOR: &str = "scheduler:schedules";

/// A schedule's id: from 1, never reused in one file.
pub type ScheduleId = u64;

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SCHEDULES)?;
    Ok(())
}

/// What a schedule does when a period is due while the task of its previous fire has not
/// finished on every target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the period (it counts as dealt with; it is not fired later).
    #[default]
    Skip,
    /// Fire anyway.
    Allow,
}

/// A schedule as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSchedule {
    /// The cron expression (already checked by [`crate::schedule::CronExpr::parse`]).
    pub cron: String,
    /// The overlap policy.
    pub overlap: Overlap,
    /// The task every fire creates (targets are resolved at each fire).
    pub task: TaskSpec,
    /// The API key name that created it.
    pub created_by: String,
}

/// A stored schedule and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// The id.
    pub id: ScheduleId,
    /// The cron expression, UTC.
    pub cron: String,
    /// The overlap policy.
    pub overlap: Overlap,
    /// The task every fire creates.
    pub task: TaskSpec,
    /// Paused schedules do not fire.
    pub paused: bool,
    /// Creation time, unix ms.
    pub created_at_ms: u64,
    /// The API key name that created it.
    pub created_by: String,
    /// Periods at or before this time (unix seconds) are done: the last period fired,
    /// skipped or failed, or the creation or resume time.
    pub since_secs: u64,
    /// The last period that created a task, unix seconds.
    pub last_fire_secs: Option<u64>,
    /// The task that fire created.
    pub last_task_id: Option<TaskId>,
    /// Why the last due period created no task (no agent matched, say); cleared by a fire.
    pub last_error: Option<String>,
    /// Periods that created a task.
    pub fired: u64,
    /// Periods skipped by the overlap policy.
    pub skipped: u64,
}

/// What [`Store::fire_schedule`] did for one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fire {
    /// A new task.
    Created(TaskId),
    /// The period's idempotency key already had a task (nothing new was created).
    Replayed(TaskId),
    /// Skipped: the previous fire's task is unfinished and the policy is `skip`.
    Skipped {
        /// The unfinished task.
        running: TaskId,
    },
    /// The task could not be created (no agent matches, an unknown node): recorded in
    /// `last_error`, the period counts as done.
    Failed(String),
    /// Nothing to do: paused, deleted meanwhile, or the period is already done.
    NotDue,
}

impl Store {
    /// Stores a new schedule (its periods start after `now_secs`) and its audit entry in
    /// one transaction.
    pub fn create_schedule(
        &self,
        new: &NewSchedule,
        at_ms: u64,
        audit: impl FnOnce(ScheduleId) -> NewAuditEntry,
    ) -> Result<(ScheduleRecord, AuditEntry), StoreError> {
        validate_spec(&new.task)?;
        self.write(|txn| {
            let id = {
                let mut meta = txn.open_table(META)?;
                let id = meta.get(META_NEXT_SCHEDULE_ID)?.map_or(1, |v| v.value());
                let next = id
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Corrupt("schedule ids exhausted".to_owned()))?;
                meta.insert(META_NEXT_SCHEDULE_ID, next)?;
                id
            };
            let record = ScheduleRecord {
                id,
                cron: new.cron.clone(),
                overlap: new.overlap,
                task: new.task.clone(),
                paused: false,
                created_at_ms: at_ms,
                created_by: new.created_by.clone(),
                since_secs: at_ms / 1000,
                last_fire_secs: None,
                last_task_id: None,
                last_error: None,
                fired: 0,
                skipped: 0,
            };
            put(txn, &record)?;
            let entry = append_in(txn, at_ms, audit(id))?;
            Ok((record, entry))
        })
    }

    /// Every schedule, by id.
    pub fn schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SCHEDULES)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            out.push(decode(v.value(), "schedule")?);
        }
        Ok(out)
    }

    /// One schedule.
    pub fn schedule(&self, id: ScheduleId) -> Result<Option<ScheduleRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SCHEDULES)?;
        match table.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "schedule")?)),
            None => Ok(None),
        }
    }

    /// Deletes a schedule (tasks it created stay) and appends its audit entry, in one
    /// transaction. [`StoreError::UnknownSchedule`] if there is none.
    pub fn delete_schedule(
        &self,
        id: ScheduleId,
        at_ms: u64,
        audit: impl FnOnce(&ScheduleRecord) -> NewAuditEntry,
    ) -> Result<(ScheduleRecord, AuditEntry), StoreError> {
        self.write(|txn| {
            let record = get(txn, id)?.ok_or(StoreError::UnknownSchedule(id))?;
            txn.open_table(SCHEDULES)?.remove(id)?;
            let entry = append_in(txn, at_ms, audit(&record))?;
            Ok((record, entry))
        })
    }

    /// Pauses or resumes a schedule, with its audit entry. Resuming moves `since_secs` to
    /// `at_ms` (if later), so periods that passed while paused are not caught up.
    pub fn set_schedule_paused(
        &self,
        id: ScheduleId,
        paused: bool,
        at_ms: u64,
        audit: impl FnOnce(&ScheduleRecord) -> NewAuditEntry,
    ) -> Result<(ScheduleRecord, AuditEntry), StoreError> {
        self.write(|txn| {
            let mut record = get(txn, id)?.ok_or(StoreError::UnknownSchedule(id))?;
            if record.paused && !paused {
                record.since_secs = record.since_secs.max(at_ms / 1000);
            }
            record.paused = paused;
            put(txn, &record)?;
            let entry = append_in(txn, at_ms, audit(&record))?;
            Ok((record, entry))
        })
    }

    /// Fires schedule `id` for `period` (unix seconds) in one durable transaction: unless
    /// the schedule is paused, gone, or already past `period` ([`Fire::NotDue`], nothing
    /// written), it applies the overlap policy, creates the task under the idempotency key
    /// `schedule:<id>:<period>`, moves `since_secs` to `period` and appends a
    /// `schedule.fire` audit entry made by `audit(outcome)`. See the module docs.
    ///
    /// The key is kept, and pruned, like any idempotency key: `retention_ms` is the
    /// idempotency retention, and each fire prunes a few expired keys so that frequent
    /// schedules do not grow the table without bound. `since_secs` stays the first guard.
    pub fn fire_schedule(
        &self,
        id: ScheduleId,
        period: u64,
        at_ms: u64,
        retention_ms: u64,
        audit: impl FnOnce(&Fire) -> NewAuditEntry,
    ) -> Result<(Fire, Option<AuditEntry>), StoreError> {
        let txn = begin_durable_write(&self.db)?;
        let Some(mut record) = get(&txn, id)? else {
            txn.abort()?;
            return Ok((Fire::NotDue, None));
        };
        if record.paused || period <= record.since_secs {
            txn.abort()?;
            return Ok((Fire::NotDue, None));
        }
        let running = match (record.overlap, record.last_task_id) {
            (Overlap::Skip, Some(last)) => {
                let targets = txn.open_table(TARGETS)?;
                let unfinished = read_targets(&targets, last)?
                    .iter()
                    .any(|(_, s)| !s.state.is_terminal());
                unfinished.then_some(last)
            }
            _ => None,
        };
        let outcome = match running {
            Some(running) => Fire::Skipped { running },
            None => {
                let claim = IdempotencyClaim {
                    actor: SCHEDULE_ACTOR.to_owned(),
                    key: fire_key(id, period),
                    fingerprint: fire_key(id, period),
                    not_before_ms: at_ms.saturating_sub(retention_ms),
                };
                let mut spec = record.task.clone();
                spec.traceparent = None;
                match validate_spec(&spec)
                    .and_then(|()| create_once_in(&txn, &spec, at_ms, Some(&claim)))
                {
                    Ok(Created::New(task)) => Fire::Created(task),
                    Ok(Created::Replayed(task)) => Fire::Replayed(task),
                    // Refused before anything was written: the period is done, with a reason.
                    Err(
                        e @ (StoreError::NoTargets
                        | StoreError::UnknownAgent(_)
                        | StoreError::InvalidSpec(_)),
                    ) => Fire::Failed(e.to_string()),
                    Err(e) => return Err(e),
                }
            }
        };
        record.since_secs = period;
        match &outcome {
            Fire::Created(task) | Fire::Replayed(task) => {
                record.last_fire_secs = Some(period);
                record.last_task_id = Some(*task);
                record.last_error = None;
                record.fired = record.fired.saturating_add(1);
            }
            Fire::Skipped { .. } => record.skipped = record.skipped.saturating_add(1),
            Fire::Failed(e) => record.last_error = Some(e.clone()),
            Fire::NotDue => {}
        }
        put(&txn, &record)?;
        let entry = append_in(&txn, at_ms, audit(&outcome))?;
        txn.commit()?;
        Ok((outcome, Some(entry)))
    }
}

/// The idempotency key of schedule `id`'s fire for `period`.
pub fn fire_key(id: ScheduleId, period: u64) -> String {
    format!("schedule:{id}:{period}")
}

fn get(txn: &WriteTransaction, id: ScheduleId) -> Result<Option<ScheduleRecord>, StoreError> {
    let table = txn.open_table(SCHEDULES)?;
    let value = table.get(id)?;
    match value {
        Some(v) => Ok(Some(decode(v.value(), "schedule")?)),
        None => Ok(None),
    }
}

fn put(txn: &WriteTransaction, record: &ScheduleRecord) -> Result<(), StoreError> {
    txn.open_table(SCHEDULES)?
        .insert(record.id, encode(record, "schedule")?.as_slice())?;
    Ok(())
}
