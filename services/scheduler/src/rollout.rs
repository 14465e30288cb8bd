//! Staged rollouts, driven: every [`TICK`] the active instance steps each unfinished
//! rollout ([`crate::store`]'s `step_rollout`: finish the batch in flight when it is done,
//! or start the next one when its pause has passed), then does what the step asks of the
//! network: dispatch a started batch's task (or push its upgrade or config version) to the agents that are up
//! (the others get it when they register, like any task or upgrade), tell agents whose
//! targets a closed batch cancelled. A standby has no store open and steps nothing; after a takeover the new
//! active instance picks up from the last committed step.

use std::sync::Weak;
use std::time::Duration;

use messages::fleet;
use serde_json::json;
use servicekit::clock::now_ms;

use crate::Shared;
use crate::audit;
use crate::bus::{self, BusError, blocking};
use crate::store::{RolloutId, RolloutState, StartedWork, Step, Work};

/// How often the loop steps the rollouts: a batch finishes or starts at most this late.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// The audit actor of steps (no API key makes them).
pub(crate) const STEP_ACTOR: &str = "scheduler";

/// The audit detail of a step.
fn step_detail(step: &Step) -> serde_json::Value {
    match step {
        Step::Idle => json!({}),
        Step::Started { work, nodes } => {
            let mut v = json!({"step": "batch_started", "nodes": nodes.len()});
            match work {
                StartedWork::Task { task_id, .. } => v["task_id"] = json!(task_id),
                StartedWork::Upgrade(u) => v["upgrade_id"] = json!(u.id),
                StartedWork::Config(c) => v["config_version"] = json!(c.version),
            }
            v
        }
        Step::Finished { outcome, state, .. } => json!({
            "step": "batch_finished",
            "batch": outcome.index,
            "task_id": work_id(outcome.work, true),
            "upgrade_id": work_id(outcome.work, false),
            "config_version": config_version(outcome.work),
            "succeeded": outcome.succeeded,
            "failed": outcome.failed,
            "unfinished": outcome.unfinished,
            "state": state,
        }),
        Step::Halted(reason) => json!({"step": "halted", "reason": reason}),
        Step::Completed => json!({"step": "completed"}),
    }
}

/// The task id (`task`) or upgrade id of a batch's work, if it is of that kind.
pub(crate) fn work_id(work: Work, task: bool) -> Option<u64> {
    match work {
        Work::Task(id) if task => Some(id),
        Work::Upgrade(id) if !task => Some(id),
        _ => None,
    }
}

/// The config version a batch's work pinned, if it is a config batch.
pub(crate) fn config_version(work: Work) -> Option<u64> {
    match work {
        Work::Config(version) => Some(version),
        _ => None,
    }
}

/// Steps every unfinished rollout once at `now_ms` (public so tests can drive it).
pub(crate) async fn tick(shared: &Shared, now: u64) -> Result<(), BusError> {
    let active = blocking(shared, |store| store.active_rollouts()).await?;
    for id in active {
        // A batch that finished lets the next one start in the same pass (when there is no
        // pause), rather than a tick later; two steps at most, so one rollout cannot hog
        // the loop.
        for _ in 0..2 {
            match step(shared, id, now).await {
                Ok(true) => {}
                Ok(false) => break,
                // One rollout failing (a full disk, say) does not hold up the others.
                Err(e) => {
                    shared.metrics.bus_errors.inc();
                    tracing::warn!(rollout = id, error = %e, "Rollout step failed.");
                    break;
                }
            }
        }
    }
    Ok(())
}

/// One step of rollout `id`, and its dispatches and cancels; `true` when it closed a batch
/// and the rollout is still running (so another step may start the next batch now).
async fn step(shared: &Shared, id: RolloutId, now: u64) -> Result<bool, BusError> {
    let (step, entry, up, state) = blocking(shared, move |store| {
        let (step, entry) = store.step_rollout(id, now, |record, step| audit::NewAuditEntry {
            actor: STEP_ACTOR.to_owned(),
            action: audit::ROLLOUT_STEP.to_owned(),
            target: format!("rollout/{}", record.id),
            detail: step_detail(step),
            trace_id: None,
        })?;
        let mut up = Vec::new();
        if let Step::Started {
            nodes,
            work: StartedWork::Task { .. },
        } = &step
        {
            up = store.up_of(nodes)?;
        }
        let state = store.rollout(id)?.map(|r| r.state);
        Ok((step, entry, up, state))
    })
    .await?;
    if let Some(entry) = &entry {
        audit::log(entry);
    }
    let again = matches!(step, Step::Finished { .. }) && state == Some(RolloutState::Running);
    match step {
        Step::Idle => {}
        Step::Started { work, nodes } => {
            shared.metrics.rollout_batches.inc();
            match work {
                StartedWork::Task { task_id, spec } => {
                    shared.metrics.tasks_created.inc();
                    tracing::info!(
                        rollout = id,
                        task_id,
                        nodes = nodes.len(),
                        up = up.len(),
                        "Rollout batch started."
                    );
                    if let Err(e) = bus::dispatch_many(shared, task_id, &spec, up).await {
                        tracing::warn!(rollout = id, task_id, error = %e, "Dispatch failed.");
                    }
                }
                StartedWork::Upgrade(upgrade) => {
                    tracing::info!(
                        rollout = id,
                        upgrade_id = upgrade.id,
                        nodes = nodes.len(),
                        "Rollout batch started."
                    );
                    if let Err(e) = crate::upgrades::push_to_up(shared, nodes, &upgrade).await {
                        tracing::warn!(rollout = id, upgrade_id = upgrade.id, error = %e, "Upgrade push failed.");
                    }
                }
                StartedWork::Config(version) => {
                    tracing::info!(
                        rollout = id,
                        config = %version.name,
                        version = version.version,
                        nodes = nodes.len(),
                        "Rollout batch started."
                    );
                    if let Err(e) = crate::configs::push_to_up(shared, nodes, &version).await {
                        tracing::warn!(rollout = id, config = %version.name, error = %e, "Config push failed.");
                    }
                }
            }
        }
        Step::Finished {
            outcome, cancelled, ..
        } => {
            tracing::info!(
                rollout = id,
                batch = outcome.index,
                succeeded = outcome.succeeded,
                failed = outcome.failed,
                unfinished = outcome.unfinished,
                state = ?state,
                "Rollout batch finished."
            );
            if state == Some(RolloutState::Halted) {
                shared.metrics.rollout_halts.inc();
                tracing::warn!(rollout = id, "Rollout halted by its failure threshold.");
            }
            if let Work::Task(task_id) = outcome.work {
                cancel(shared, task_id, &cancelled).await;
            }
        }
        Step::Halted(reason) => {
            shared.metrics.rollout_halts.inc();
            tracing::warn!(rollout = id, %reason, "Rollout halted.");
        }
        Step::Completed => tracing::info!(rollout = id, "Rollout completed."),
    }
    Ok(again)
}

/// Tells the agents of `nodes` that `task_id` is cancelled (their targets already are).
pub(crate) async fn cancel(shared: &Shared, task_id: u64, nodes: &[messages::UserId]) {
    for node in nodes {
        if let Err(e) = bus::push(
            shared,
            node,
            fleet::down::CANCEL,
            &fleet::Cancel { task_id },
            None,
        )
        .await
        {
            tracing::warn!(%node, task_id, error = %e, "Pushing a cancel failed.");
        }
    }
}

/// Every [`TICK`], steps the rollouts, until `shared` is dropped (the active phase ended).
pub(crate) async fn run(shared: Weak<Shared>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if let Err(e) = tick(&shared, now_ms()).await {
            shared.metrics.bus_errors.inc();
            tracing::warn!(error = %e, "Rollout pass failed.");
        }
    }
}
