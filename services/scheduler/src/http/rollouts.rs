//! `/v1/rollouts`: staged rollouts ([`crate::rollout`], [`crate::store`]'s rollouts). Create
//! (`POST`, `targets` and either a task's `spec`/`timeout_ms`/`max_attempts` or an agent
//! `upgrade` of an uploaded artifact or a `config` version, plus `stages`, `batch`,
//! `pause_ms`, `max_failure_percent`, `batch_timeout_ms`, `auto_promote`), list, get (with
//! per-stage progress and the live state of the batch in flight), and the controls `pause`,
//! `resume`, `promote` and `abort`. Reads take any key, changes an operator key; every
//! change is one audit entry in the same transaction. A control the rollout's state does
//! not allow is a 409 `rollout_state` and changes nothing.

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use messages::fleet;
use serde::Deserialize;
use serde_json::json;
use servicekit::clock::now_ms;
use servicekit::http::ApiError;
use servicekit::telemetry::server_span;

use super::{TargetsRequest, authorize, spec_json, targets_json, task_spec};
use crate::Shared;
use crate::audit;
use crate::bus::blocking;
use crate::rollout;
use crate::rollout::{config_version, work_id};
use crate::store::{
    Control, NewRollout, RolloutAction, RolloutConfig, RolloutRecord, RolloutTask, RolloutUpgrade,
    Size, StagePlan, TaskSpec, Work,
};

/// Registers the routes.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/rollouts", web::post().to(create))
        .route("/v1/rollouts", web::get().to(list))
        .route("/v1/rollouts/{id}", web::get().to(get))
        .route("/v1/rollouts/{id}/{control}", web::post().to(control));
}

/// Failure threshold when a request names none, percent of a stage.
const DEFAULT_MAX_FAILURE_PERCENT: u8 = 5;
/// Added to a batch's worst-case task time for its default deadline.
const DEFAULT_BATCH_SLACK_MS: u64 = 60_000;
/// Longest pause between batches accepted (a day).
const MAX_PAUSE_MS: u64 = 86_400_000;
/// What a config batch's deadline allows for one agent's apply (validate, rename, reload).
const DEFAULT_CONFIG_APPLY_MS: u64 = 60_000;
/// An upgrade's per-agent deadline when a request names none.
const DEFAULT_UPGRADE_DEADLINE_SECS: u64 = 120;

/// A size in a request: a number (count) or a string (`"25"`, `"10%"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeRequest {
    Count(u64),
    Text(String),
}

impl SizeRequest {
    fn parse(self) -> Result<Size, ApiError> {
        match self {
            SizeRequest::Count(0) => Err(ApiError::bad(
                "invalid_rollout",
                "a size is at least 1 node",
            )),
            SizeRequest::Count(n) => Ok(Size::Count(n)),
            SizeRequest::Text(s) => {
                Size::parse(&s).map_err(|e| ApiError::bad("invalid_rollout", e))
            }
        }
    }
}

/// One stage in a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageRequest {
    name: String,
    size: SizeRequest,
}

/// The upgrade a rollout applies (`upgrade` in `POST /v1/rollouts`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeRequest {
    /// The uploaded artifact.
    sha256: String,
    /// The version the new binary reports.
    version: String,
    /// How long each agent's new binary gets to come online.
    #[serde(default)]
    deadline_secs: Option<u64>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    arch: Option<String>,
}

/// The config version a rollout moves its targets to (`config` in `POST /v1/rollouts`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigRequest {
    /// The document.
    name: String,
    /// A kept version (stage it with `"activate": false` in `POST /v1/configs/{name}`).
    version: u64,
}

/// Body of `POST /v1/rollouts`: a task (`spec`, with `timeout_ms` and `max_attempts`), an
/// agent upgrade (`upgrade`) or a config version (`config`): exactly one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRollout {
    targets: TargetsRequest,
    #[serde(default)]
    spec: Option<fleet::TaskKind>,
    #[serde(default)]
    upgrade: Option<UpgradeRequest>,
    #[serde(default)]
    config: Option<ConfigRequest>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_attempts: Option<u32>,
    /// Cumulative stages; default pilot 1%, gray 20%, full 100%.
    #[serde(default)]
    stages: Option<Vec<StageRequest>>,
    /// Nodes per batch within a stage; default the whole stage.
    #[serde(default)]
    batch: Option<SizeRequest>,
    #[serde(default)]
    pause_ms: Option<u64>,
    #[serde(default)]
    max_failure_percent: Option<u8>,
    #[serde(default)]
    batch_timeout_ms: Option<u64>,
    #[serde(default)]
    auto_promote: Option<bool>,
}

fn rollout_id(path: &str) -> Result<u64, ApiError> {
    path.parse()
        .map_err(|_| ApiError::bad("malformed_id", "rollout ids are decimal numbers"))
}

/// The API form of a rollout. `batch_states` are the live target states of the batch in
/// flight, when the caller read them.
pub(crate) fn rollout_json(
    rec: &RolloutRecord,
    batch_states: Option<&std::collections::BTreeMap<String, u64>>,
) -> serde_json::Value {
    let (succeeded, failed) = rec.done();
    let stages: Vec<_> = rec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "name": s.name,
                "size": s.size.to_string(),
                "nodes": s.end - s.start,
                "batch": s.batch,
                "allowed_failures": s.allowed_failures,
                "succeeded": s.succeeded,
                "failed": s.failed,
                "current": i == rec.stage,
                "started_at_ms": s.started_at_ms,
                "finished_at_ms": s.finished_at_ms,
            })
        })
        .collect();
    let batch = rec.batch.as_ref().map(|b| {
        json!({
            "index": b.index,
            "nodes": b.end - b.start,
            "task_id": work_id(b.work, true),
            "upgrade_id": work_id(b.work, false),
            "config_version": config_version(b.work),
            "started_at_ms": b.started_at_ms,
            "deadline_ms": b.deadline_ms,
            "states": batch_states,
        })
    });
    let history: Vec<_> = rec
        .history
        .iter()
        .map(|h| {
            json!({
                "index": h.index,
                "stage": h.stage,
                "nodes": h.nodes,
                "task_id": work_id(h.work, true),
                "upgrade_id": work_id(h.work, false),
                "config_version": config_version(h.work),
                "succeeded": h.succeeded,
                "failed": h.failed,
                "unfinished": h.unfinished,
                "started_at_ms": h.started_at_ms,
                "finished_at_ms": h.finished_at_ms,
            })
        })
        .collect();
    let mut out = json!({
        "rollout_id": rec.id,
        "state": rec.state,
        "reason": rec.reason,
        "targets": targets_json(&rec.targets),
        "total": rec.total,
        "started": rec.next,
        "succeeded": succeeded,
        "failed": failed,
        "stage": rec.stages.get(rec.stage).map(|s| s.name.as_str()),
        "stages": stages,
        "batch": batch,
        "batches_started": rec.batches_started,
        "history": history,
        "pause_ms": rec.pause_ms,
        "max_failure_percent": rec.max_failure_percent,
        "batch_timeout_ms": rec.batch_timeout_ms,
        "auto_promote": rec.auto_promote,
        "accepted_failures": rec.accepted_failures,
        "created_at_ms": rec.created_at_ms,
        "created_by": rec.created_by,
        "updated_at_ms": rec.updated_at_ms,
    });
    match &rec.action {
        RolloutAction::Task(task) => {
            out["task"] = spec_json(&TaskSpec {
                kind: task.kind.clone(),
                targets: rec.targets.clone(),
                timeout_ms: task.timeout_ms,
                max_attempts: task.max_attempts,
                traceparent: None,
            });
        }
        RolloutAction::Upgrade(u) => {
            out["upgrade"] = json!({
                "sha256": u.sha256,
                "version": u.version,
                "deadline_ms": u.deadline_ms,
                "os": u.os,
                "arch": u.arch,
            });
        }
        RolloutAction::Config(c) => {
            out["config"] = json!({"name": c.name, "version": c.version});
        }
    }
    out
}

async fn create(
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let request = server_span(&req, "/v1/rollouts");
    let actor = authorize(&req, &shared)?.traced(&request);
    let raw = body.into_inner();
    let body: CreateRollout = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
    let (action, targets, attempt_deadline_ms) = match (body.spec, body.upgrade, body.config) {
        (Some(kind), None, None) => {
            let spec = task_spec(
                &shared,
                body.targets,
                &kind,
                body.timeout_ms,
                body.max_attempts,
                None,
            )?;
            let worst = spec.timeout_ms.saturating_mul(u64::from(spec.max_attempts));
            let task = RolloutTask {
                kind: spec.kind,
                timeout_ms: spec.timeout_ms,
                max_attempts: spec.max_attempts,
            };
            (RolloutAction::Task(task), spec.targets, worst)
        }
        (None, Some(u), None) => {
            if body.timeout_ms.is_some() || body.max_attempts.is_some() {
                return Err(ApiError::bad(
                    "invalid_rollout",
                    "timeout_ms and max_attempts are for task rollouts; an upgrade has deadline_secs",
                ));
            }
            let deadline_ms = u
                .deadline_secs
                .unwrap_or(DEFAULT_UPGRADE_DEADLINE_SECS)
                .saturating_mul(1000);
            let upgrade = RolloutUpgrade {
                sha256: u.sha256,
                version: u.version,
                deadline_ms,
                os: u.os,
                arch: u.arch,
            };
            (
                RolloutAction::Upgrade(upgrade),
                body.targets.into_targets()?,
                deadline_ms,
            )
        }
        (None, None, Some(c)) => {
            if body.timeout_ms.is_some() || body.max_attempts.is_some() {
                return Err(ApiError::bad(
                    "invalid_rollout",
                    "timeout_ms and max_attempts are for task rollouts",
                ));
            }
            let config = RolloutConfig {
                name: c.name,
                version: c.version,
            };
            // An agent applies a config in well under a second; a minute covers a slow
            // validate or reload command.
            (
                RolloutAction::Config(config),
                body.targets.into_targets()?,
                DEFAULT_CONFIG_APPLY_MS,
            )
        }
        _ => {
            return Err(ApiError::bad(
                "invalid_rollout",
                "give exactly one of spec (a task), upgrade (an agent upgrade) or config (a config version)",
            ));
        }
    };
    let stages = body
        .stages
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            Ok(StagePlan {
                name: s.name,
                size: s.size.parse()?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let batch = body.batch.map(SizeRequest::parse).transpose()?;
    let pause_ms = body.pause_ms.unwrap_or(0);
    if pause_ms > MAX_PAUSE_MS {
        return Err(ApiError::bad(
            "invalid_rollout",
            format!("pause_ms is at most {MAX_PAUSE_MS}"),
        ));
    }
    let max_failure_percent = body
        .max_failure_percent
        .unwrap_or(DEFAULT_MAX_FAILURE_PERCENT);
    // By default a batch gets every attempt's full deadline, and a minute more for agents
    // to come back, before unfinished targets count as failed.
    let batch_timeout_ms = body
        .batch_timeout_ms
        .unwrap_or_else(|| attempt_deadline_ms.saturating_add(DEFAULT_BATCH_SLACK_MS));
    let new = NewRollout {
        action,
        targets,
        stages,
        batch,
        pause_ms,
        max_failure_percent,
        batch_timeout_ms,
        auto_promote: body.auto_promote.unwrap_or(false),
        created_by: actor.name.clone(),
    };
    let (record, entry) = blocking(&shared, move |store| {
        store.create_rollout(&new, now_ms(), |rec| {
            audit::entry(
                &actor,
                audit::ROLLOUT_CREATE,
                format!("rollout/{}", rec.id),
                json!({ "request": raw, "total": rec.total }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    tracing::info!(
        rollout = record.id,
        total = record.total,
        "Rollout created."
    );
    Ok(HttpResponse::Created().json(rollout_json(&record, None)))
}

async fn list(req: HttpRequest, shared: web::Data<Arc<Shared>>) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let rollouts = blocking(&shared, |store| store.rollouts()).await?;
    Ok(HttpResponse::Ok().json(json!({
        "rollouts": rollouts.iter().map(|r| rollout_json(r, None)).collect::<Vec<_>>(),
    })))
}

async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let id = rollout_id(&path)?;
    Ok(HttpResponse::Ok().json(view(&shared, id).await?))
}

/// The API form of rollout `id` with the live states of its batch in flight (`GET
/// /v1/rollouts/{id}`, and the console's rollout page).
pub(crate) async fn view(shared: &Arc<Shared>, id: u64) -> Result<serde_json::Value, ApiError> {
    let (record, states) = blocking(shared, move |store| {
        let Some(record) = store.rollout(id)? else {
            return Ok((None, None));
        };
        let mut states = std::collections::BTreeMap::new();
        match record.batch.as_ref().map(|b| b.work) {
            Some(Work::Task(task_id)) => {
                for s in store.task(task_id)?.iter().flat_map(|t| t.targets.values()) {
                    let name = serde_json::to_value(s.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    *states.entry(name).or_insert(0u64) += 1;
                }
            }
            Some(Work::Upgrade(id)) => {
                for n in store.upgrade(id)?.1 {
                    *states.entry(n.state.as_str().to_owned()).or_insert(0u64) += 1;
                }
            }
            Some(Work::Config(version)) => {
                let batch = record.batch.as_ref().map_or(0..0, |b| b.start..b.end);
                let nodes = store.rollout_nodes(id)?;
                let in_batch: std::collections::BTreeSet<&str> = nodes
                    .get(
                        usize::try_from(batch.start).unwrap_or(usize::MAX)
                            ..usize::try_from(batch.end).unwrap_or(0),
                    )
                    .unwrap_or_default()
                    .iter()
                    .map(messages::UserId::as_str)
                    .collect();
                if let RolloutAction::Config(c) = &record.action {
                    for n in store.config_status(&c.name)?.1 {
                        if in_batch.contains(n.node_id.as_str()) && n.desired_version == version {
                            let state = serde_json::to_value(n.state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default();
                            *states.entry(state).or_insert(0u64) += 1;
                        }
                    }
                }
            }
            None => return Ok((Some(record), None)),
        }
        let states = Some(states);
        Ok((Some(record), states))
    })
    .await?;
    let record = record.ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))?;
    Ok(rollout_json(&record, states.as_ref()))
}

async fn control(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let (id, control) = path.into_inner();
    let id = rollout_id(&id)?;
    let record = control_as(&shared, actor, id, &control).await?;
    Ok(HttpResponse::Ok().json(rollout_json(&record, None)))
}

/// Applies `control` (`pause`, `resume`, `promote`, `abort`) to rollout `id` on behalf of
/// `actor`, audited in the same transaction; the API and the console both go through here.
pub(crate) async fn control_as(
    shared: &Arc<Shared>,
    actor: crate::auth::Actor,
    id: u64,
    control: &str,
) -> Result<RolloutRecord, ApiError> {
    let control = match control {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "promote" => Control::Promote,
        "abort" => Control::Abort,
        other => {
            return Err(ApiError::not_found(format!(
                "no rollout control {other:?}: use pause, resume, promote or abort"
            )));
        }
    };
    let (controlled, entry) = blocking(shared, move |store| {
        store.control_rollout(id, control, now_ms(), |rec| {
            audit::entry(
                &actor,
                audit::ROLLOUT_CONTROL,
                format!("rollout/{id}"),
                json!({ "control": control.name(), "state": rec.state }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    tracing::info!(rollout = id, control = control.name(), state = ?controlled.record.state, "Rollout control.");
    if let Some((task_id, nodes)) = &controlled.cancelled {
        rollout::cancel(shared, *task_id, nodes).await;
    }
    Ok(controlled.record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests_parse_with_sizes_as_numbers_or_strings() {
        let ok: Result<CreateRollout, _> = serde_json::from_value(json!({
            "targets": {"labels": {"region": "eu"}},
            "spec": {"kind": "command", "argv": ["uptime"]},
            "stages": [{"name": "pilot", "size": 1}, {"name": "full", "size": "100%"}],
            "batch": "10%",
        }));
        let Ok(ok) = ok else {
            panic!("should parse: {ok:?}")
        };
        let stages: Vec<Size> = ok
            .stages
            .into_iter()
            .flatten()
            .filter_map(|s| s.size.parse().ok())
            .collect();
        assert_eq!(stages, vec![Size::Count(1), Size::Percent(100)]);
        assert_eq!(
            ok.batch.and_then(|b| b.parse().ok()),
            Some(Size::Percent(10))
        );
        let unknown: Result<CreateRollout, _> = serde_json::from_value(json!({
            "targets": {"nodes": ["n1"]},
            "spec": {"kind": "command", "argv": ["x"]},
            "canary": 1,
        }));
        assert!(unknown.is_err());
        for bad in [
            json!(0),
            json!("0"),
            json!("0%"),
            json!("101%"),
            json!("ten"),
        ] {
            let size: SizeRequest = match serde_json::from_value(bad.clone()) {
                Ok(s) => s,
                Err(_) => continue,
            };
            assert!(size.parse().is_err(), "{bad} should be refused");
        }
    }
}
