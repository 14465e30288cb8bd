//! The operators' HTTP API: agents (list with label/state filters, get one), tasks (create,
//! list, get with per-target states and results, cancel), versioned config documents
//! ([`configs`]: set, get, history, per-node status, rollback), schedules ([`schedules`]),
//! agent artifacts and upgrades ([`upgrades`]; the artifact download takes an agent token),
//! TCP tunnels to agents' ports ([`tunnels`], a WebSocket),
//! the audit log, plus `/healthz`, `/readyz` and `/metrics`. Every `/v1` route needs
//! `Authorization: Bearer <api key>`: any key may `GET`, only operator keys may change
//! anything ([`crate::auth`]); every change is audited ([`crate::audit`]). Every error is a
//! 4xx/5xx with a JSON body `{"error", "detail"}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use messages::{UserId, fleet};
use serde::Deserialize;
use serde_json::json;
use servicekit::http::ApiError;
use servicekit::telemetry::server_span;

use crate::Shared;
use crate::audit;
use crate::auth::Actor;
use crate::bus::{self, BusError, blocking, store_kind, wire_kind};
use crate::store::{
    AgentRecord, AgentState, Created, IdempotencyClaim, LabelSelector, MAX_AUDIT_LIST,
    MAX_IDEMPOTENCY_KEY_LEN, StoreError, TargetState, Targets, TaskSpec,
};
use servicekit::clock::now_ms;

mod configs;
pub(crate) mod rollouts;
mod schedules;
mod tunnels;
mod upgrades;

/// The OpenAPI document served at `/v1/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// Most tasks one listing returns.
const MAX_LIST: usize = 1000;

/// Registers the routes.
pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(servicekit::http::healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/openapi.json", web::get().to(openapi))
        .route("/v1/agents", web::get().to(list_agents))
        .route("/v1/agents/{id}", web::get().to(get_agent))
        .route("/v1/tasks", web::post().to(create_task))
        .route("/v1/tasks", web::get().to(list_tasks))
        .route("/v1/tasks/{id}", web::get().to(get_task))
        .route("/v1/tasks/{id}/output", web::get().to(task_output))
        .route("/v1/tasks/{id}/cancel", web::post().to(cancel_task))
        .route("/v1/agents/{id}/revoke", web::post().to(revoke_agent))
        .route("/v1/agents/{id}/revoke", web::delete().to(unrevoke_agent))
        .route("/v1/agents/{id}/token", web::post().to(enrol_agent))
        .route("/v1/agents/{id}/refusals", web::get().to(agent_refusals))
        .route("/v1/agents/{id}/labels", web::put().to(pin_labels))
        .route("/v1/audit", web::get().to(list_audit))
        .configure(configs::routes)
        .configure(rollouts::routes)
        .configure(schedules::routes)
        .configure(tunnels::routes)
        .configure(upgrades::routes);
}

/// The routes of a standby (an instance waiting for the leader lease, with no store open):
/// `/healthz` answers 200, `/readyz` 503 with `{"ready": false, "role": "standby"}`, and
/// everything else 503 with `{"error": "standby"}`, so a load balancer sends operators to
/// the active instance and a client that reaches this one learns why it cannot help.
pub(crate) fn standby_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(servicekit::http::healthz))
        .route("/readyz", web::get().to(standby_readyz))
        .default_service(web::to(standby_api));
}

async fn standby_readyz(instance: web::Data<String>) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({
        "ready": false,
        "role": "standby",
        "instance": instance.as_str(),
    }))
}

async fn standby_api() -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "standby",
        "this scheduler is standing by; another instance holds the leader lease",
    ))
}

/// Store and bus failures as API errors: the caller's mistakes are 4xx, the rest 503.
impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Store(StoreError::InvalidSpec(m)) => ApiError::bad("invalid_task", m),
            BusError::Store(StoreError::UnknownAgent(id)) => {
                ApiError::bad("unknown_agent", format!("agent {id} is not registered"))
            }
            BusError::Store(StoreError::NoTargets) => {
                ApiError::bad("no_targets", "no registered agent matches the selector")
            }
            BusError::Store(StoreError::UnknownTask(id)) => {
                ApiError::not_found(format!("no task {id}"))
            }
            BusError::Store(StoreError::UnknownSchedule(id)) => {
                ApiError::not_found(format!("no schedule {id}"))
            }
            BusError::Store(StoreError::InvalidConfig(m)) => ApiError::bad("invalid_config", m),
            BusError::Store(StoreError::InvalidUpgrade(m)) => ApiError::bad("invalid_upgrade", m),
            BusError::Store(StoreError::UnknownArtifact(sha)) => ApiError::bad(
                "unknown_artifact",
                format!("no artifact {sha} was uploaded (POST /v1/artifacts)"),
            ),
            BusError::Store(StoreError::UnknownUpgrade(id)) => {
                ApiError::not_found(format!("no upgrade {id}"))
            }
            BusError::Store(
                e @ (StoreError::UnknownConfig(_) | StoreError::UnknownConfigVersion { .. }),
            ) => ApiError::not_found(e.to_string()),
            BusError::Store(StoreError::InvalidRollout(m)) => ApiError::bad("invalid_rollout", m),
            BusError::Store(StoreError::UnknownRollout(id)) => {
                ApiError::not_found(format!("no rollout {id}"))
            }
            BusError::Store(e @ StoreError::ConfigInRollout { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "config_in_rollout", e.to_string())
            }
            BusError::Store(e @ StoreError::RolloutConflict { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "rollout_state", e.to_string())
            }
            BusError::Store(e @ StoreError::IdempotencyConflict { .. }) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!("{e}; use a new key for a new request"),
            ),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                other.to_string(),
            ),
        }
    }
}

/// The caller's key, checked against the scope the request's method needs (`GET`: any key;
/// anything else: operator). The returned actor names the key for the audit log.
fn authorize(req: &HttpRequest, shared: &Shared) -> Result<Actor, ApiError> {
    crate::auth::authorize(req, &shared.config.api_keys)
}

/// The header that makes `POST /v1/tasks` safe to retry.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The request's `Idempotency-Key`, if it sent one: 1 to 255 visible ASCII characters.
fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().map(str::trim).unwrap_or_default();
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::bad(
            "bad_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// JSON with every object's keys sorted: two requests that differ only in key order or
/// white space are the same request.
fn canonical(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(canonical).collect())
        }
        other => other.clone(),
    }
}

/// The query string as (key, value) pairs, keeping repeated keys.
fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, ApiError> {
    servicekit::query::pairs(req.query_string())
        .map_err(|e| ApiError::bad("bad_query", format!("cannot decode: {e}")))
}

fn parse_agent_state(s: &str) -> Result<AgentState, ApiError> {
    match s {
        "online" => Ok(AgentState::Online),
        "degraded" => Ok(AgentState::Degraded),
        "offline" => Ok(AgentState::Offline),
        other => Err(ApiError::bad(
            "bad_state",
            format!("state {other:?}: use online, degraded or offline"),
        )),
    }
}

fn parse_target_state(s: &str) -> Result<TargetState, ApiError> {
    serde_json::from_value(json!(s))
        .map_err(|_| ApiError::bad("bad_state", format!("unknown task state {s:?}")))
}

pub(crate) fn node_id(s: &str) -> Result<UserId, ApiError> {
    UserId::new(s).map_err(|e| ApiError::bad("malformed_id", format!("node {s:?}: {e}")))
}

fn agent_json(a: &AgentRecord) -> serde_json::Value {
    json!({
        "node_id": a.node_id.as_str(),
        "hostname": a.hostname,
        "version": a.version,
        "labels": a.labels,
        "addresses": a.addresses,
        "registered_at_ms": a.registered_at_ms,
        "last_seen_ms": a.last_seen_ms,
        "state": a.state,
        "via": a.via.as_ref().map(messages::UserId::as_str),
    })
}

/// Targets as the API shows them: `{"nodes": [...]}` or `{"labels": {...}}`, as requested.
pub(crate) fn targets_json(targets: &Targets) -> serde_json::Value {
    match targets {
        Targets::Nodes(ids) => {
            json!({ "nodes": ids.iter().map(UserId::as_str).collect::<Vec<_>>() })
        }
        Targets::Selector(sel) => json!({ "labels": sel }),
    }
}

pub(crate) fn spec_json(spec: &TaskSpec) -> serde_json::Value {
    let (kind, agent_timeout_ms) = wire_kind(&spec.kind);
    let targets = targets_json(&spec.targets);
    json!({
        "spec": kind,
        "targets": targets,
        "timeout_ms": agent_timeout_ms,
        "deadline_ms": spec.timeout_ms,
        "max_attempts": spec.max_attempts,
    })
}

async fn list_agents(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let mut selector = LabelSelector::new();
    let mut state = None;
    for (k, v) in query_pairs(&req)? {
        match k.as_str() {
            "label" => {
                let (lk, lv) = v
                    .split_once('=')
                    .filter(|(lk, _)| !lk.is_empty())
                    .ok_or_else(|| ApiError::bad("bad_label", format!("{v:?}: use key=value")))?;
                selector.insert(lk.to_owned(), lv.to_owned());
            }
            "state" => state = Some(parse_agent_state(&v)?),
            other => {
                return Err(ApiError::bad(
                    "bad_query",
                    format!("unknown parameter {other:?}"),
                ));
            }
        }
    }
    let agents = blocking(&shared, move |store| store.agents(&selector, state)).await?;
    Ok(HttpResponse::Ok().json(json!({
        "agents": agents.iter().map(agent_json).collect::<Vec<_>>(),
    })))
}

async fn get_agent(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let node = node_id(&path)?;
    let n = node.clone();
    let (agent, pinned) = blocking(&shared, move |store| {
        Ok((store.agent(&n)?, store.pinned_labels(&n)?))
    })
    .await?;
    let agent = agent.ok_or_else(|| ApiError::not_found(format!("no agent {node}")))?;
    let mut v = agent_json(&agent);
    v["pinned_labels"] = json!(pinned);
    v["revoked"] = json!(shared.trust.is_revoked(&node));
    Ok(HttpResponse::Ok().json(v))
}

/// Which agents a new task runs on.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum TargetsRequest {
    /// Explicit node ids.
    Nodes(Vec<String>),
    /// Every registered agent with all these labels.
    Labels(BTreeMap<String, String>),
}

impl TargetsRequest {
    /// The stored form; every node id is checked.
    fn into_targets(self) -> Result<Targets, ApiError> {
        Ok(match self {
            TargetsRequest::Nodes(ids) => {
                Targets::Nodes(ids.iter().map(|s| node_id(s)).collect::<Result<_, _>>()?)
            }
            TargetsRequest::Labels(sel) => Targets::Selector(sel),
        })
    }
}

/// Body of `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    targets: TargetsRequest,
    spec: fleet::TaskKind,
    /// How long the agent lets one attempt run, ms.
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Attempts per target including the first.
    #[serde(default)]
    max_attempts: Option<u32>,
}

/// Default attempt timeout when a request names none.
const DEFAULT_TASK_TIMEOUT_MS: u64 = 60_000;

/// The stored spec of a task request (`POST /v1/tasks`, and each fire of a schedule).
fn task_spec(
    shared: &Shared,
    targets: TargetsRequest,
    kind: &fleet::TaskKind,
    timeout_ms: Option<u64>,
    max_attempts: Option<u32>,
    traceparent: Option<String>,
) -> Result<TaskSpec, ApiError> {
    let targets = targets.into_targets()?;
    let timeout_ms = timeout_ms.unwrap_or(DEFAULT_TASK_TIMEOUT_MS);
    if timeout_ms == 0 {
        return Err(ApiError::bad(
            "invalid_task",
            "timeout_ms must be at least 1",
        ));
    }
    // The scheduler's deadline adds the configured dispatch slack to the agent's own
    // timeout: delivery, start-up and the result's way back take time too.
    let slack = u64::try_from(shared.config.dispatch_timeout.as_millis()).unwrap_or(u64::MAX);
    Ok(TaskSpec {
        kind: store_kind(kind, timeout_ms),
        targets,
        timeout_ms: timeout_ms.saturating_add(slack),
        max_attempts: max_attempts.unwrap_or(1),
        traceparent,
    })
}

async fn create_task(
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let request = server_span(&req, "/v1/tasks");
    let actor = authorize(&req, &shared)?.traced(&request);
    let key = idempotency_key(&req)?;
    let created = submit_task(
        &shared,
        actor,
        body.into_inner(),
        key,
        request.context().map(|t| t.to_traceparent()),
    )
    .await?;
    if created.replayed {
        return Ok(HttpResponse::Ok()
            .insert_header(("idempotent-replayed", "true"))
            .json(json!({ "task_id": created.task_id, "replayed": true })));
    }
    let mut body = json!({
        "task_id": created.task_id,
        "dispatched": created.dispatched,
        "replayed": false,
    });
    if let Some(trace) = request.context() {
        body["trace_id"] = json!(trace.trace_id_hex());
    }
    Ok(HttpResponse::Created().json(body))
}

/// What [`submit_task`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Submitted {
    /// The task (the earlier one for an idempotent retry).
    pub task_id: u64,
    /// Targets it was pushed to at once.
    pub dispatched: u64,
    /// An idempotent retry: nothing new was created, audited or dispatched.
    pub replayed: bool,
}

/// Creates a task from a `POST /v1/tasks` body on behalf of `actor`: validation, the
/// idempotency claim, the audit entry in the task's transaction, and the dispatch to the
/// targets that are up. The API and the console both create tasks through here.
pub(crate) async fn submit_task(
    shared: &Arc<Shared>,
    actor: Actor,
    raw: serde_json::Value,
    key: Option<String>,
    traceparent: Option<String>,
) -> Result<Submitted, ApiError> {
    let body: CreateTask = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
    let spec = task_spec(
        shared,
        body.targets,
        &body.spec,
        body.timeout_ms,
        body.max_attempts,
        traceparent,
    )?;
    let created = spec.clone();
    let now = now_ms();
    let retention = u64::try_from(shared.config.idempotency_ttl.as_millis()).unwrap_or(u64::MAX);
    let claim = key.map(|key| IdempotencyClaim {
        actor: actor.name.clone(),
        key,
        fingerprint: canonical(&raw).to_string(),
        not_before_ms: now.saturating_sub(retention),
    });
    let audit_actor = actor.clone();
    let audit_detail = json!({
        "request": raw,
        "idempotency_key": claim.as_ref().map(|c| c.key.as_str()),
    });
    let claimed = claim.clone();
    let (outcome, entry, up) = blocking(shared, move |store| {
        let (outcome, entry) = store.create_task_once(&created, now, claimed.as_ref(), |id| {
            audit::entry(
                &audit_actor,
                audit::TASK_CREATE,
                format!("task/{id}"),
                audit_detail,
            )
        })?;
        let mut up = Vec::new();
        if let Created::New(id) = outcome
            && let Some(task) = store.task(id)?
        {
            up = store.up_of(task.targets.keys())?;
        }
        Ok((outcome, entry, up))
    })
    .await?;
    let task_id = match outcome {
        Created::New(id) => id,
        Created::Replayed(id) => {
            // A retry: nothing new happened, so nothing is audited or dispatched.
            tracing::info!(task_id = id, actor = %actor.name, "Idempotent retry; returning the task it created.");
            return Ok(Submitted {
                task_id: id,
                dispatched: 0,
                replayed: true,
            });
        }
    };
    if let Some(entry) = &entry {
        audit::log(entry);
    }
    shared.metrics.tasks_created.inc();
    // Targets that are up get it now; the others when they register again.
    // Not fatal for the request when this fails: targets still Pending go out on the next
    // register, ones left Dispatched expire and are retried by the sweep.
    let dispatched = match bus::dispatch_many(shared, task_id, &spec, up).await {
        Ok((sent, _)) => sent,
        Err(e) => {
            tracing::warn!(task_id, error = %e, "Dispatch failed.");
            0
        }
    };
    Ok(Submitted {
        task_id,
        dispatched,
        replayed: false,
    })
}

async fn list_tasks(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let mut limit = 100;
    let mut state = None;
    for (k, v) in query_pairs(&req)? {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad("bad_query", "limit must be a number"))?
                    .min(MAX_LIST);
            }
            "state" => state = Some(parse_target_state(&v)?),
            other => {
                return Err(ApiError::bad(
                    "bad_query",
                    format!("unknown parameter {other:?}"),
                ));
            }
        }
    }
    let tasks = blocking(&shared, move |store| store.tasks(limit, state)).await?;
    let list: Vec<_> = tasks
        .iter()
        .map(|t| {
            let mut v = spec_json(&t.spec);
            v["task_id"] = json!(t.id);
            v["created_at_ms"] = json!(t.created_at_ms);
            v["states"] = json!(t.states);
            v["finished"] = json!(t.is_finished());
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "tasks": list })))
}

fn task_id(path: &str) -> Result<u64, ApiError> {
    path.parse()
        .map_err(|_| ApiError::bad("malformed_id", "task ids are decimal numbers"))
}

async fn get_task(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let id = task_id(&path)?;
    let (task, results) = blocking(&shared, move |store| {
        Ok((store.task(id)?, store.results_for(id)?))
    })
    .await?;
    let task = task.ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    let mut v = spec_json(&task.spec);
    v["task_id"] = json!(task.id);
    v["created_at_ms"] = json!(task.created_at_ms);
    v["finished"] = json!(task.targets.values().all(|s| s.state.is_terminal()));
    v["targets"] = json!(
        task.targets
            .iter()
            .map(|(node, status)| (node.as_str().to_owned(), json!(status)))
            .collect::<serde_json::Map<_, _>>()
    );
    v["results"] = json!(results);
    v["output"] = output_json(&shared, id);
    Ok(HttpResponse::Ok().json(v))
}

/// The kept output chunks of a task, per node.
fn output_json(shared: &Shared, id: u64) -> serde_json::Value {
    json!(
        shared
            .output
            .for_task(id)
            .into_iter()
            .map(|(node, chunks)| (node.as_str().to_owned(), json!(chunks)))
            .collect::<serde_json::Map<_, _>>()
    )
}

/// The kept output of a task as JSON, or with `follow=1` live as Server-Sent Events
/// ([`crate::follow`]).
async fn task_output(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let id = task_id(&path)?;
    let follow = query_pairs(&req)?
        .iter()
        .any(|(k, v)| k == "follow" && matches!(v.as_str(), "1" | "true"));
    let exists = blocking(&shared, move |store| Ok(store.task(id)?.is_some())).await?;
    if !exists {
        return Err(ApiError::not_found(format!("no task {id}")));
    }
    if !follow {
        return Ok(HttpResponse::Ok().json(json!({
            "task_id": id,
            "output": output_json(&shared, id),
        })));
    }
    follow_response(shared.get_ref(), id)
}

/// The live output of task `id` as a Server-Sent Events response ([`crate::follow`]); 503
/// when [`crate::follow::MAX_FOLLOWERS`] clients follow already. The caller has checked that
/// the task exists. The API's `?follow=1` and the console's task page both stream this.
pub(crate) fn follow_response(shared: &Arc<Shared>, id: u64) -> Result<HttpResponse, ApiError> {
    let shared = Arc::clone(shared);
    let slot = crate::follow::Slot::take(&shared).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_followers",
            format!(
                "{} clients are following output already; try again later",
                crate::follow::MAX_FOLLOWERS
            ),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    actix_web::rt::spawn(crate::follow::run(shared, id, tx, slot));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Reverse proxies (nginx) would otherwise buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

async fn cancel_task(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let id = task_id(&path)?;
    let cancelled = cancel(&shared, actor, id).await?;
    Ok(HttpResponse::Ok().json(json!({
        "task_id": id,
        "cancelled": cancelled.iter().map(UserId::as_str).collect::<Vec<_>>(),
    })))
}

/// Cancels every unfinished target of task `id` on behalf of `actor` (audited in the same
/// transaction) and tells the agents that had it; returns the cancelled targets. The API
/// and the console both cancel through here.
pub(crate) async fn cancel(
    shared: &Arc<Shared>,
    actor: Actor,
    id: u64,
) -> Result<Vec<UserId>, ApiError> {
    let (cancelled, entry) = blocking(shared, move |store| {
        store.cancel_audited(id, now_ms(), |cancelled| {
            let nodes: Vec<&str> = cancelled.iter().map(|(n, _)| n.as_str()).collect();
            audit::entry(
                &actor,
                audit::TASK_CANCEL,
                format!("task/{id}"),
                json!({ "cancelled": nodes }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    // Only agents that had the task need telling; pending targets never left the store.
    for (node, old) in &cancelled {
        if old.is_in_flight()
            && let Err(e) = bus::push(
                shared,
                node,
                fleet::down::CANCEL,
                &fleet::Cancel { task_id: id },
                None,
            )
            .await
        {
            tracing::warn!(%node, task_id = id, error = %e, "Pushing a cancel failed.");
        }
    }
    Ok(cancelled.into_iter().map(|(n, _)| n).collect())
}

/// `POST /v1/agents/{id}/revoke`: the node is disconnected everywhere, refused when it
/// comes back, gets no more credentials, and nothing it sends is stored or acknowledged.
async fn revoke_agent(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let node = node_id(&path)?;
    let newly = revoke(&shared, actor, &node).await?;
    Ok(HttpResponse::Ok().json(json!({"node_id": node.as_str(), "revoked": true, "newly": newly})))
}

/// Revokes `node` on behalf of `actor`: stored, audited, and its connections closed;
/// whether it was newly revoked. The API and the console both revoke through here.
pub(crate) async fn revoke(
    shared: &Arc<Shared>,
    actor: Actor,
    node: &UserId,
) -> Result<bool, ApiError> {
    let n = node.clone();
    let newly = blocking(shared, move |store| store.revoke(&n, now_ms())).await?;
    shared.trust.set_revoked(node, true);
    tracing::warn!(%node, newly, "Agent revoked.");
    audit::record(
        shared,
        &actor,
        audit::AGENT_REVOKE,
        format!("agent/{node}"),
        json!({"newly": newly}),
    )
    .await?;
    bus::close_agent(shared, node, messages::CloseCode::Revoked).await?;
    Ok(newly)
}

/// `DELETE /v1/agents/{id}/revoke`: lifts a revocation; the node still needs a valid
/// credential (`POST /v1/agents/{id}/token`) to come back.
async fn unrevoke_agent(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let node = node_id(&path)?;
    let n = node.clone();
    let was = blocking(&shared, move |store| store.unrevoke(&n)).await?;
    shared.trust.set_revoked(&node, false);
    tracing::warn!(%node, was, "Agent revocation lifted.");
    audit::record(
        &shared,
        &actor,
        audit::AGENT_UNREVOKE,
        format!("agent/{node}"),
        json!({"was_revoked": was}),
    )
    .await?;
    Ok(HttpResponse::Ok()
        .json(json!({"node_id": node.as_str(), "revoked": false, "was_revoked": was})))
}

/// Body of `POST /v1/agents/{id}/token`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolRequest {
    /// Lifetime of the enrolment token, seconds (default 1 day, at most 30 days).
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// `POST /v1/agents/{id}/token`: an enrolment token for a new (or re-enrolled) node. The
/// agent trades it for short-lived renewed tokens as soon as it registers.
async fn enrol_agent(
    req: HttpRequest,
    path: web::Path<String>,
    body: Option<web::Json<EnrolRequest>>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let node = node_id(&path)?;
    if shared.trust.is_revoked(&node) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "revoked",
            format!("{node} is revoked; lift it first (DELETE /v1/agents/{node}/revoke)"),
        ));
    }
    let Some(tokens) = shared.config.agent_tokens.as_ref() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_agent_token_key",
            "this scheduler has no agent-token key (SCHEDULER_AGENT_TOKEN_KEY_FILE)",
        ));
    };
    let ttl = body
        .and_then(|b| b.ttl_secs)
        .unwrap_or(86_400)
        .clamp(1, 30 * 86_400);
    let (token, expires_at) = tokens
        .mint(&node, now_ms() / 1000, std::time::Duration::from_secs(ttl))
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "mint_failed",
                e.to_string(),
            )
        })?;
    tracing::info!(%node, expires_at, "Enrolment token issued.");
    // The token itself is a credential: never in the log.
    audit::record(
        &shared,
        &actor,
        audit::AGENT_ENROL,
        format!("agent/{node}"),
        json!({"expires_at": expires_at, "kid": tokens.kid()}),
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "node_id": node.as_str(),
        "token": token,
        "expires_at": expires_at,
        "kid": tokens.kid(),
    })))
}

/// Body of `PUT /v1/agents/{id}/labels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinLabels {
    labels: BTreeMap<String, String>,
}

/// `PUT /v1/agents/{id}/labels`: replaces the labels pinned for a node. Pinned labels
/// override what the agent reports at every register; `{}` unpins all.
async fn pin_labels(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<PinLabels>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let node = node_id(&path)?;
    let labels = body.into_inner().labels;
    for (k, v) in &labels {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'=' && b != b',')
        };
        if !ok(k) || !ok(v) {
            return Err(ApiError::bad(
                "bad_label",
                format!("label {k:?}={v:?}: 1-128 visible ASCII characters, no '=' or ','"),
            ));
        }
    }
    let n = node.clone();
    let pinned = labels.clone();
    let effective = blocking(&shared, move |store| store.pin_labels(&n, &pinned)).await?;
    audit::record(
        &shared,
        &actor,
        audit::AGENT_LABELS,
        format!("agent/{node}"),
        json!({"pinned": labels}),
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "node_id": node.as_str(),
        "pinned": labels,
        "labels": effective,
    })))
}

/// `GET /v1/agents/{id}/refusals`: commands the node refused, oldest first.
async fn agent_refusals(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let node = node_id(&path)?;
    let n = node.clone();
    let refusals = blocking(&shared, move |store| store.refusals(&n)).await?;
    Ok(HttpResponse::Ok().json(json!({
        "node_id": node.as_str(),
        "revoked": shared.trust.is_revoked(&node),
        "refusals": refusals,
    })))
}

/// `GET /v1/audit?since=<seq>&limit=<n>`: entries after sequence number `since` (default
/// 0), oldest first, at most `limit` (default 100, at most 1000); `next` is the `since` for
/// the following page.
async fn list_audit(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let mut since = 0u64;
    let mut limit = 100usize;
    for (k, v) in query_pairs(&req)? {
        match k.as_str() {
            "since" => {
                since = v
                    .parse()
                    .map_err(|_| ApiError::bad("bad_query", "since must be a sequence number"))?;
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad("bad_query", "limit must be a number"))?
                    .min(MAX_AUDIT_LIST);
            }
            other => {
                return Err(ApiError::bad(
                    "bad_query",
                    format!("unknown parameter {other:?}"),
                ));
            }
        }
    }
    let entries = blocking(&shared, move |store| store.audit(since, limit)).await?;
    let next = entries.last().map_or(since, |e| e.seq);
    Ok(HttpResponse::Ok().json(json!({ "entries": entries, "next": next })))
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

async fn readyz(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    let connected = shared.client.connection_state() == async_nats::connection::State::Connected;
    let body = json!({
        "ready": connected,
        "nats_connected": connected,
        "role": "active",
        "instance": shared.config.instance,
    });
    if connected {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(shared: web::Data<Arc<Shared>>) -> HttpResponse {
    servicekit::http::metrics_response(shared.metrics.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        for path in [
            "/v1/agents",
            "/v1/agents/{id}",
            "/v1/agents/{id}/tunnel",
            "/v1/tasks",
            "/v1/tasks/{id}",
            "/v1/tasks/{id}/output",
            "/v1/tasks/{id}/cancel",
            "/v1/schedules",
            "/v1/schedules/{id}",
            "/v1/schedules/{id}/pause",
            "/v1/schedules/{id}/resume",
            "/v1/audit",
            "/v1/configs",
            "/v1/configs/{name}",
            "/v1/configs/{name}/history",
            "/v1/configs/{name}/status",
            "/v1/configs/{name}/rollback",
            "/v1/artifacts",
            "/v1/artifacts/{sha256}",
            "/v1/upgrades",
            "/v1/upgrades/{id}",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
    }

    #[test]
    fn canonical_json_ignores_key_order_only() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":{"y":1,"x":[{"q":1,"p":2}]},"a":2}"#).unwrap_or_default();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "a": 2, "b": {"x": [{"p": 2, "q": 1}], "y": 1} }"#)
                .unwrap_or_default();
        assert_eq!(canonical(&a).to_string(), canonical(&b).to_string());
        let c: serde_json::Value =
            serde_json::from_str(r#"{"a":2,"b":{"x":[{"p":2,"q":1}],"y":2}}"#).unwrap_or_default();
        assert_ne!(canonical(&a).to_string(), canonical(&c).to_string());
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let with = |v: &str| {
            actix_web::test::TestRequest::default()
                .insert_header((IDEMPOTENCY_KEY, v))
                .to_http_request()
        };
        assert_eq!(
            idempotency_key(&with("retry-1")).ok().flatten().as_deref(),
            Some("retry-1")
        );
        assert!(idempotency_key(&with("")).is_err());
        assert!(idempotency_key(&with("a b")).is_err());
        assert!(idempotency_key(&with(&"k".repeat(256))).is_err());
        let none = actix_web::test::TestRequest::default().to_http_request();
        assert!(matches!(idempotency_key(&none), Ok(None)));
    }

    #[test]
    fn create_requests_parse_both_target_forms() {
        let by_nodes: Result<CreateTask, _> = serde_json::from_value(json!({
            "targets": {"nodes": ["n1"]},
            "spec": {"kind": "command", "argv": ["uptime"]},
            "timeout_ms": 1000
        }));
        assert!(matches!(
            by_nodes.map(|c| c.targets),
            Ok(TargetsRequest::Nodes(_))
        ));
        let by_labels: Result<CreateTask, _> = serde_json::from_value(json!({
            "targets": {"labels": {"region": "eu"}},
            "spec": {"kind": "tcp_probe", "target": "127.0.0.1:1"}
        }));
        assert!(matches!(
            by_labels.map(|c| c.targets),
            Ok(TargetsRequest::Labels(_))
        ));
        let unknown: Result<CreateTask, _> = serde_json::from_value(json!({
            "targets": {"nodes": ["n1"]},
            "spec": {"kind": "command", "argv": ["x"]},
            "bogus": 1
        }));
        assert!(unknown.is_err());
    }
}
