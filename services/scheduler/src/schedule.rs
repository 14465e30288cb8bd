//! Schedules: recurring tasks from cron expressions, evaluated in UTC, fired only by the
//! active instance (the loop runs on the active phase's bus runtime; a standby has no
//! store open and runs nothing).
//!
//! The time rules are pure functions of their inputs, so tests give them any "now":
//! [`CronExpr`] parses an expression (5 fields, or 6 with leading seconds) and finds
//! occurrences; [`due`] says which period, if any, is due. **Catch-up:** when several
//! periods were missed (the scheduler was down, a standby took over, the loop lagged),
//! only the latest missed one fires, once; earlier ones are dropped. Storage and the
//! no-double-fire guarantee are [`crate::store`]'s `fire_schedule` (one transaction for the
//! period, the task, its idempotency key and the audit entry). [`run`] is the loop; one
//! pass is [`tick`].

use std::str::FromStr;
use std::sync::Weak;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde_json::json;
use servicekit::clock::{now_ms, now_secs};

use crate::Shared;
use crate::audit;
use crate::bus::{self, BusError, blocking};
use crate::store::{Fire, ScheduleRecord};

/// How often the loop looks for due schedules: a fire is at most this late.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Longest cron expression accepted.
pub(crate) const MAX_CRON_LEN: usize = 200;
/// The audit actor of fires (no API key fires a schedule).
pub(crate) const FIRE_ACTOR: &str = "scheduler";

/// Why a cron expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ScheduleError {
    /// The expression does not parse; the message says why.
    #[error("invalid cron expression {expr:?}: {reason}")]
    InvalidCron {
        /// The expression as given.
        expr: String,
        /// The parser's reason.
        reason: String,
    },
    /// The expression parses but never occurs (`0 0 30 2 *`).
    #[error("cron expression {0:?} never fires")]
    NeverFires(String),
}

/// A parsed cron expression: minute hour day-of-month month day-of-week, optionally with a
/// leading seconds field; names (`MON`, `JAN`) and `L`/`W`/`#` as croner accepts them.
/// Always evaluated in UTC.
#[derive(Debug, Clone)]
pub(crate) struct CronExpr {
    cron: Cron,
}

impl CronExpr {
    /// Parses and checks that the expression fires at least once after `now_secs`.
    pub(crate) fn parse(expr: &str, now_secs: u64) -> Result<Self, ScheduleError> {
        let invalid = |reason: String| ScheduleError::InvalidCron {
            expr: expr.to_owned(),
            reason,
        };
        if expr.len() > MAX_CRON_LEN {
            return Err(invalid(format!("longer than {MAX_CRON_LEN} characters")));
        }
        if expr.trim().starts_with('@') {
            return Err(invalid(
                "nicknames (@daily, ...) are not accepted".to_owned(),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| invalid(e.to_string()))?;
        let parsed = CronExpr { cron };
        if parsed.next_after(now_secs).is_none() {
            return Err(ScheduleError::NeverFires(expr.to_owned()));
        }
        Ok(parsed)
    }

    /// The first occurrence strictly after `secs` (unix seconds, UTC).
    pub(crate) fn next_after(&self, secs: u64) -> Option<u64> {
        let t = utc(secs)?;
        let next = self.cron.find_next_occurrence(&t, false).ok()?;
        u64::try_from(next.timestamp()).ok()
    }

    /// The last occurrence at or before `secs`.
    pub(crate) fn latest_at_or_before(&self, secs: u64) -> Option<u64> {
        let t = utc(secs)?;
        let prev = self.cron.find_previous_occurrence(&t, true).ok()?;
        u64::try_from(prev.timestamp()).ok()
    }
}

impl FromStr for CronExpr {
    type Err = ScheduleError;

    /// Parses without a "now" (checks that it fires after 1970 only).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CronExpr::parse(s, 0)
    }
}

fn utc(secs: u64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(i64::try_from(secs).ok()?, 0)
}

/// The period due at `now` for a schedule whose periods up to `since` are done: the latest
/// occurrence `p` with `since < p <= now`, or `None`. Missed periods before `p` are not
/// returned (catch-up fires the latest missed period only).
pub(crate) fn due(cron: &CronExpr, since: u64, now: u64) -> Option<u64> {
    if now <= since {
        return None;
    }
    cron.latest_at_or_before(now).filter(|p| *p > since)
}

/// Fires every due schedule once (see [`due`]) and dispatches the tasks created to the
/// targets that are up; returns the outcomes (a schedule whose fire failed is logged and
/// left out). `now` is unix seconds. Fails only if the schedules cannot be read.
pub(crate) async fn tick(shared: &Shared, now: u64) -> Result<Vec<(u64, Fire)>, BusError> {
    let schedules = blocking(shared, |store| store.schedules()).await?;
    let mut outcomes = Vec::new();
    for record in schedules.into_iter().filter(|s| !s.paused) {
        let Ok(cron) = CronExpr::parse(&record.cron, 0) else {
            tracing::warn!(schedule = record.id, cron = %record.cron, "Stored cron expression does not parse; skipping.");
            continue;
        };
        let Some(period) = due(&cron, record.since_secs, now) else {
            continue;
        };
        // One schedule failing (a full disk, say) does not hold up the others; it is
        // retried on the next tick.
        match fire(shared, &record, period).await {
            Ok(outcome) => outcomes.push((record.id, outcome)),
            Err(e) => {
                shared.metrics.bus_errors.inc();
                tracing::warn!(schedule = record.id, period, error = %e, "Firing a schedule failed.");
            }
        }
    }
    Ok(outcomes)
}

/// Fires one schedule for `period` and dispatches its task.
async fn fire(shared: &Shared, record: &ScheduleRecord, period: u64) -> Result<Fire, BusError> {
    let id = record.id;
    let retention = u64::try_from(shared.config.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
    let (outcome, entry, up) = blocking(shared, move |store| {
        let (outcome, entry) = store.fire_schedule(id, period, now_ms(), retention, |outcome| {
            let detail = match outcome {
                Fire::Created(task) | Fire::Replayed(task) => {
                    json!({"period": period, "task_id": task})
                }
                Fire::Skipped { running } => {
                    json!({"period": period, "skipped": true, "running_task_id": running})
                }
                Fire::Failed(e) => json!({"period": period, "error": e}),
                Fire::NotDue => json!({"period": period}),
            };
            audit::NewAuditEntry {
                actor: FIRE_ACTOR.to_owned(),
                action: audit::SCHEDULE_FIRE.to_owned(),
                target: format!("schedule/{id}"),
                detail,
                trace_id: None,
            }
        })?;
        let mut up = Vec::new();
        if let Fire::Created(task_id) = outcome
            && let Some(task) = store.task(task_id)?
        {
            up = store.up_of(task.targets.keys())?;
        }
        Ok((outcome, entry, up))
    })
    .await?;
    if let Some(entry) = &entry {
        audit::log(entry);
    }
    match &outcome {
        Fire::Created(task_id) => {
            shared.metrics.tasks_created.inc();
            shared.metrics.schedule_fires.inc();
            tracing::info!(schedule = id, period, task_id, "Schedule fired.");
            if let Err(e) = bus::dispatch_many(shared, *task_id, &record.task, up).await {
                tracing::warn!(task_id, error = %e, "Dispatch failed.");
            }
        }
        Fire::Skipped { running } => {
            shared.metrics.schedule_skips.inc();
            tracing::info!(
                schedule = id,
                period,
                running,
                "Previous run unfinished; period skipped."
            );
        }
        Fire::Failed(e) => {
            tracing::warn!(schedule = id, period, error = %e, "Schedule fired but created no task.");
        }
        Fire::Replayed(_) | Fire::NotDue => {}
    }
    Ok(outcome)
}

/// Every [`TICK`], fires what is due, until `shared` is dropped (the active phase ended).
pub(crate) async fn run(shared: Weak<Shared>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if let Err(e) = tick(&shared, now_secs()).await {
            shared.metrics.bus_errors.inc();
            tracing::warn!(error = %e, "Schedule pass failed.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-01T00:00:00Z.
    const T0: u64 = 1_767_225_600;

    fn cron(s: &str) -> CronExpr {
        match CronExpr::parse(s, T0) {
            Ok(c) => c,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn next_fire_is_computed_in_utc() {
        let every5 = cron("*/5 * * * *");
        assert_eq!(every5.next_after(T0), Some(T0 + 300));
        assert_eq!(every5.next_after(T0 + 1), Some(T0 + 300));
        assert_eq!(every5.next_after(T0 + 299), Some(T0 + 300));
        // 02:30 UTC daily, whatever the machine's time zone.
        let daily = cron("30 2 * * *");
        assert_eq!(daily.next_after(T0), Some(T0 + 2 * 3600 + 1800));
        // Six fields: seconds first.
        let every_sec = cron("* * * * * *");
        assert_eq!(every_sec.next_after(T0), Some(T0 + 1));
        let weekday = cron("0 9 * * MON");
        // 2026-01-01 is a Thursday: the next Monday is the 5th.
        assert_eq!(weekday.next_after(T0), Some(T0 + 4 * 86_400 + 9 * 3600));
    }

    #[test]
    fn bad_expressions_are_refused_with_a_reason() {
        for bad in [
            "",
            "* * *",
            "61 * * * *",
            "* 25 * * *",
            "hello",
            "* * * * * * * *",
            "@daily",
        ] {
            assert!(
                matches!(
                    CronExpr::parse(bad, T0),
                    Err(ScheduleError::InvalidCron { .. })
                ),
                "{bad:?} should be invalid"
            );
        }
        assert!(CronExpr::parse(&"*".repeat(300), T0).is_err());
        assert!(matches!(
            CronExpr::parse("0 0 31 2 *", T0),
            Err(ScheduleError::NeverFires(_)) | Err(ScheduleError::InvalidCron { .. })
        ));
    }

    #[test]
    fn nothing_is_due_before_the_first_period() {
        let every5 = cron("*/5 * * * *");
        // Created at T0 + 10: the next period is T0 + 300.
        assert_eq!(due(&every5, T0 + 10, T0 + 10), None);
        assert_eq!(due(&every5, T0 + 10, T0 + 299), None);
        assert_eq!(due(&every5, T0 + 10, T0 + 300), Some(T0 + 300));
        assert_eq!(due(&every5, T0 + 10, T0 + 301), Some(T0 + 300));
    }

    #[test]
    fn a_period_that_is_done_is_never_due_again() {
        let every5 = cron("*/5 * * * *");
        assert_eq!(due(&every5, T0 + 300, T0 + 300), None);
        assert_eq!(due(&every5, T0 + 300, T0 + 599), None);
        assert_eq!(due(&every5, T0 + 300, T0 + 600), Some(T0 + 600));
        // A clock that went backwards fires nothing.
        assert_eq!(due(&every5, T0 + 600, T0 + 100), None);
    }

    #[test]
    fn catch_up_fires_only_the_latest_missed_period() {
        let every5 = cron("*/5 * * * *");
        // Down from T0 + 10 until T0 + 3 h + 7 min: 38 periods missed, one fires.
        let now = T0 + 3 * 3600 + 7 * 60;
        assert_eq!(due(&every5, T0 + 10, now), Some(T0 + 3 * 3600 + 5 * 60));
        // And after it is done nothing else is due until the next period.
        assert_eq!(due(&every5, T0 + 3 * 3600 + 5 * 60, now), None);
    }

    #[test]
    fn every_second_fires_each_second_once() {
        let every = cron("* * * * * *");
        let mut since = T0;
        let mut fired = Vec::new();
        // Evaluated four times a second, as the loop does.
        for quarter in 1..=20u64 {
            let now = T0 + quarter / 4;
            if let Some(p) = due(&every, since, now) {
                fired.push(p);
                since = p;
            }
        }
        assert_eq!(fired, (T0 + 1..=T0 + 5).collect::<Vec<_>>());
    }
}
