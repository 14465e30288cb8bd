//! The audit log as handlers use it: who (the API key's name) did what to which target,
//! when, with which trace. Every state-changing API call records one entry after its change
//! commits (in the same transaction where the store offers one: task create and cancel), and
//! each entry is also logged at info level with the target `audit`, so a log pipeline
//! keeps a copy outside the scheduler's file. Entries are read with `GET /v1/audit`.
//!
//! The store only ever appends ([`crate::store`]'s `scheduler_audit` table); nothing in the
//! service deletes or rewrites an entry.

use serde_json::Value;

use crate::Shared;
use crate::auth::Actor;
use crate::bus::{BusError, blocking};
pub(crate) use crate::store::{AuditEntry, NewAuditEntry};
use servicekit::clock::now_ms;

/// A task was created.
pub(crate) const TASK_CREATE: &str = "task.create";
/// A task was cancelled.
pub(crate) const TASK_CANCEL: &str = "task.cancel";
/// An agent was revoked.
pub(crate) const AGENT_REVOKE: &str = "agent.revoke";
/// An agent's labels were pinned by an operator.
pub(crate) const AGENT_LABELS: &str = "agent.labels";
/// An operator lifted a node's revocation.
pub(crate) const AGENT_UNREVOKE: &str = "agent.unrevoke";
/// An operator issued an enrolment token for a node.
pub(crate) const AGENT_ENROL: &str = "agent.enrol";
/// A schedule was created.
pub(crate) const SCHEDULE_CREATE: &str = "schedule.create";
/// A schedule was deleted.
pub(crate) const SCHEDULE_DELETE: &str = "schedule.delete";
/// A schedule was paused.
pub(crate) const SCHEDULE_PAUSE: &str = "schedule.pause";
/// A schedule was resumed.
pub(crate) const SCHEDULE_RESUME: &str = "schedule.resume";
/// A schedule fired for a period (actor `scheduler`): the task it created, or why none.
pub(crate) const SCHEDULE_FIRE: &str = "schedule.fire";
/// A rollout was created.
pub(crate) const ROLLOUT_CREATE: &str = "rollout.create";
/// An operator paused, resumed, promoted or aborted a rollout (`rollout.<control>`).
pub(crate) const ROLLOUT_CONTROL: &str = "rollout.control";
/// A rollout step (actor `scheduler`): a batch started or finished, a halt, completion.
pub(crate) const ROLLOUT_STEP: &str = "rollout.step";
/// A new version of a config document was stored and made desired.
pub(crate) const CONFIG_SET: &str = "config.set";
/// A config document's desired version was moved back to an older one.
pub(crate) const CONFIG_ROLLBACK: &str = "config.rollback";
/// An agent artifact was uploaded.
pub(crate) const ARTIFACT_UPLOAD: &str = "artifact.upload";
/// An agent upgrade was started.
pub(crate) const UPGRADE_START: &str = "upgrade.start";
/// A tunnel stream was opened, or the agent refused it (`outcome`).
pub(crate) const TUNNEL_OPEN: &str = "tunnel.open";
/// A tunnel stream closed (why, bytes each way, duration).
pub(crate) const TUNNEL_CLOSE: &str = "tunnel.close";

/// The entry `actor` doing `action` to `target` makes.
pub(crate) fn entry(
    actor: &Actor,
    action: &str,
    target: impl Into<String>,
    detail: Value,
) -> NewAuditEntry {
    NewAuditEntry {
        actor: actor.name.clone(),
        action: action.to_owned(),
        target: target.into(),
        detail,
        trace_id: actor.trace_id.clone(),
    }
}

/// Logs a recorded entry at info level (target `audit`).
pub(crate) fn log(entry: &AuditEntry) {
    tracing::info!(
        target: "audit",
        seq = entry.seq,
        actor = %entry.actor,
        action = %entry.action,
        target_id = %entry.target,
        detail = %entry.detail,
        trace_id = entry.trace_id.as_deref().unwrap_or(""),
        "Audit."
    );
}

/// Appends an entry for a change that was stored on its own (its own durable transaction),
/// logs it, and returns it. Call it after the change succeeded; for changes that can share a
/// transaction with their entry, prefer the store's `audited` form.
///
/// ```ignore
/// let actor = authorize(&req, &shared)?; // in the handler
/// audit::record(&shared, &actor, audit::AGENT_REVOKE, format!("agent/{node}"), json!({})).await?;
/// ```
pub(crate) async fn record(
    shared: &Shared,
    actor: &Actor,
    action: &str,
    target: impl Into<String>,
    detail: Value,
) -> Result<AuditEntry, BusError> {
    let new = entry(actor, action, target, detail);
    let recorded = blocking(shared, move |store| store.append_audit(now_ms(), new)).await?;
    log(&recorded);
    Ok(recorded)
}
