//! `/v1/configs`: versioned config documents ([`crate::configs`]). Set (`POST`: the next
//! version becomes desired and is pushed to the targets that are up), get (the desired or
//! an older version), history, per-node status, rollback to a kept version. Reads take any
//! key, changes an operator key, and every change is one audit entry in the same
//! transaction as the change.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use messages::{UserId, fleet};
use serde::Deserialize;
use serde_json::json;
use servicekit::clock::now_ms;
use servicekit::http::ApiError;

use super::{TargetsRequest, authorize, query_pairs, targets_json};
use crate::audit;
use crate::bus::blocking;
use crate::store::{ConfigRecord, ConfigState, ConfigVersion, NewConfigVersion};
use crate::{Shared, StoreError};

/// Registers the routes.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/configs", web::get().to(list_configs))
        .route("/v1/configs/{name}", web::post().to(set_config))
        .route("/v1/configs/{name}", web::get().to(get_config))
        .route("/v1/configs/{name}/history", web::get().to(config_history))
        .route("/v1/configs/{name}/status", web::get().to(config_status))
        .route(
            "/v1/configs/{name}/rollback",
            web::post().to(rollback_config),
        );
}

/// The `{name}` of a `/v1/configs/{name}` path, if it is a safe file name.
fn config_name(s: &str) -> Result<String, ApiError> {
    fleet::check_config_name(s).map_err(|e| ApiError::bad("invalid_config", e.to_string()))?;
    Ok(s.to_owned())
}

fn config_head_json(c: &ConfigRecord) -> serde_json::Value {
    json!({
        "name": c.name,
        "desired_version": c.desired,
        "latest_version": c.latest,
        "targets": targets_json(&c.targets),
        "nodes": c.nodes.iter().map(UserId::as_str).collect::<Vec<_>>(),
        "updated_at_ms": c.updated_at_ms,
    })
}

/// A version as JSON; `content` only when asked for (history lists leave it out).
fn config_version_json(v: &ConfigVersion, desired: u64, content: bool) -> serde_json::Value {
    let mut out = json!({
        "name": v.name,
        "version": v.version,
        "sha256": v.sha256,
        "size": v.content.len(),
        "validate": v.validate,
        "reload": v.reload,
        "created_at_ms": v.created_at_ms,
        "actor": v.actor,
        "desired": v.version == desired,
    });
    if content {
        out["content"] = json!(String::from_utf8_lossy(&v.content));
    }
    out
}

/// Body of `POST /v1/configs/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetConfig {
    /// The document (UTF-8 text).
    content: String,
    targets: TargetsRequest,
    /// Run by the agent against the new file before it replaces the old one.
    #[serde(default)]
    validate: Option<Vec<String>>,
    /// Run by the agent after the file was replaced.
    #[serde(default)]
    reload: Option<Vec<String>>,
    /// Make it desired and push it at once (default); `false` only stores it, for a
    /// staged rollout (`POST /v1/rollouts` with `config`).
    #[serde(default = "yes")]
    activate: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/configs/{name}`: stores the next version, makes it desired and pushes it to
/// the targets that are up (the others get it when they register); with
/// `"activate": false` it is only stored, for a staged rollout.
async fn set_config(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<serde_json::Value>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let name = config_name(&path)?;
    let body: SetConfig = serde_json::from_value(body.into_inner())
        .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
    let targets = body.targets.into_targets()?;
    let activate = body.activate;
    let new = NewConfigVersion {
        name,
        content: body.content.into_bytes(),
        validate: body.validate,
        reload: body.reload,
        targets,
        actor: actor.name.clone(),
        activate,
    };
    let (version, nodes, entry) = blocking(&shared, move |store| {
        store.set_config(&new, now_ms(), |v, nodes| {
            audit::entry(
                &actor,
                audit::CONFIG_SET,
                format!("config/{}", v.name),
                json!({
                    "version": v.version,
                    "sha256": v.sha256,
                    "size": v.content.len(),
                    "targets": targets_json(&new.targets),
                    "nodes": nodes.iter().map(UserId::as_str).collect::<Vec<_>>(),
                    "validate": v.validate,
                    "reload": v.reload,
                    "activated": new.activate,
                }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    let targets: Vec<String> = nodes.iter().map(|n| n.as_str().to_owned()).collect();
    let pushed = if activate {
        crate::configs::push_to_up(&shared, nodes.into_iter().collect(), &version).await?
    } else {
        0
    };
    Ok(HttpResponse::Created().json(json!({
        "name": version.name,
        "version": version.version,
        "activated": activate,
        "sha256": version.sha256,
        "nodes": targets,
        "pushed": pushed,
    })))
}

/// Body of `POST /v1/configs/{name}/rollback`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    /// The kept version to make desired again.
    to: u64,
}

/// `POST /v1/configs/{name}/rollback`: makes an older kept version desired again and
/// pushes it like a new one.
async fn rollback_config(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<serde_json::Value>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let name = config_name(&path)?;
    let body: Rollback = serde_json::from_value(body.into_inner())
        .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
    let to = body.to;
    let (version, nodes, entry) = blocking(&shared, move |store| {
        store.rollback_config(&name, to, now_ms(), |v, from| {
            audit::entry(
                &actor,
                audit::CONFIG_ROLLBACK,
                format!("config/{}", v.name),
                json!({"from": from, "to": v.version, "sha256": v.sha256}),
            )
        })
    })
    .await?;
    audit::log(&entry);
    let targets: Vec<String> = nodes.iter().map(|n| n.as_str().to_owned()).collect();
    let pushed = crate::configs::push_to_up(&shared, nodes.into_iter().collect(), &version).await?;
    Ok(HttpResponse::Ok().json(json!({
        "name": version.name,
        "version": version.version,
        "sha256": version.sha256,
        "nodes": targets,
        "pushed": pushed,
    })))
}

/// `GET /v1/configs`: every document's head.
async fn list_configs(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let configs = blocking(&shared, |store| store.configs()).await?;
    Ok(HttpResponse::Ok().json(json!({
        "configs": configs.iter().map(config_head_json).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/configs/{name}[?version=N]`: the desired version (or version N) with its
/// content, and the document's head.
async fn get_config(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let name = config_name(&path)?;
    let mut version = None;
    for (k, v) in query_pairs(&req)? {
        match k.as_str() {
            "version" => {
                version =
                    Some(v.parse::<u64>().map_err(|_| {
                        ApiError::bad("bad_query", "version must be a version number")
                    })?);
            }
            other => {
                return Err(ApiError::bad(
                    "bad_query",
                    format!("unknown parameter {other:?}"),
                ));
            }
        }
    }
    let (head, v) = blocking(&shared, move |store| {
        let head = store
            .config(&name)?
            .ok_or_else(|| StoreError::UnknownConfig(name.clone()))?;
        let v = store.config_version(&name, version)?;
        Ok((head, v))
    })
    .await?;
    let mut out = config_version_json(&v, head.desired, true);
    out["config"] = config_head_json(&head);
    Ok(HttpResponse::Ok().json(out))
}

/// `GET /v1/configs/{name}/history`: the kept versions, oldest first, without content.
async fn config_history(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let name = config_name(&path)?;
    let n = name.clone();
    let (head, versions) = blocking(&shared, move |store| {
        let versions = store.config_history(&n)?;
        let head = store
            .config(&n)?
            .ok_or_else(|| StoreError::UnknownConfig(n.clone()))?;
        Ok((head, versions))
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "name": name,
        "desired_version": head.desired,
        "latest_version": head.latest,
        "versions": versions
            .iter()
            .map(|v| config_version_json(v, head.desired, false))
            .collect::<Vec<_>>(),
    })))
}

/// `GET /v1/configs/{name}/status`: per target node, the version it runs and whether that
/// is the desired one (`applied`), not yet (`pending`) or failed (with the error).
async fn config_status(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let name = config_name(&path)?;
    let n = name.clone();
    let (desired, nodes) = blocking(&shared, move |store| {
        let (desired, nodes) = store.config_status(&n)?;
        let mut out = Vec::with_capacity(nodes.len());
        for status in nodes {
            let liveness = match UserId::new(status.node_id.as_str()) {
                Ok(id) => store.agent(&id)?.map(|a| a.state),
                Err(_) => None,
            };
            out.push((status, liveness));
        }
        Ok((desired, out))
    })
    .await?;
    let mut counts: BTreeMap<&str, u64> =
        BTreeMap::from([("applied", 0), ("pending", 0), ("failed", 0)]);
    for (s, _) in &nodes {
        let key = match s.state {
            ConfigState::Applied => "applied",
            ConfigState::Pending => "pending",
            ConfigState::Failed => "failed",
        };
        *counts.entry(key).or_default() += 1;
    }
    Ok(HttpResponse::Ok().json(json!({
        "name": name,
        "desired_version": desired.version,
        "sha256": desired.sha256,
        "counts": counts,
        "nodes": nodes
            .iter()
            .map(|(s, liveness)| {
                let mut v = json!(s);
                v["agent_state"] = json!(liveness);
                v
            })
            .collect::<Vec<_>>(),
    })))
}
