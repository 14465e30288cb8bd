//! `/v1/artifacts` and `/v1/upgrades`: signed agent upgrades ([`crate::upgrades`]). Upload
//! an artifact (`POST`, the body is the binary; content-addressed by SHA-256), list them,
//! start an upgrade of targets to an artifact, read its per-node status. Operators call
//! these with API keys like every `/v1` route (changes need an operator key and are
//! audited).
//!
//! The one exception is the download, `GET /v1/artifacts/{sha256}`: agents call it with
//! their own credential (an agent token, checked against the agent-token key's public
//! half), not with an API key. A token of another kind (app), an API key, an expired token
//! or a revoked or unregistered node is refused, so the artifacts are not readable by
//! whoever can reach the API.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use messages::{UserId, fleet};
use serde::Deserialize;
use serde_json::json;
use servicekit::clock::now_ms;
use servicekit::http::ApiError;

use super::{TargetsRequest, authorize, targets_json};
use crate::Shared;
use crate::artifacts::Artifacts;
use crate::audit;
use crate::bus::blocking;
use crate::store::{ArtifactRecord, NewUpgrade, UpgradeRecord, UpgradeState};

/// Deadline of an upgrade whose request names none.
const DEFAULT_DEADLINE_SECS: u64 = 120;
/// Most upgrades one listing returns.
const MAX_LIST: usize = 100;

/// Registers the routes.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/artifacts", web::post().to(upload))
        .route("/v1/artifacts", web::get().to(list_artifacts))
        .route("/v1/artifacts/{sha256}", web::get().to(download))
        .route("/v1/upgrades", web::post().to(start_upgrade))
        .route("/v1/upgrades", web::get().to(list_upgrades))
        .route("/v1/upgrades/{id}", web::get().to(upgrade_status));
}

fn artifacts(shared: &Shared) -> Artifacts {
    Artifacts::new(shared.config.artifact_dir.clone())
}

fn artifact_json(a: &ArtifactRecord) -> serde_json::Value {
    json!({
        "sha256": a.sha256,
        "size": a.size,
        "uploaded_at_ms": a.uploaded_at_ms,
        "actor": a.actor,
        "path": fleet::artifact_path(&a.sha256),
    })
}

fn upgrade_json(u: &UpgradeRecord) -> serde_json::Value {
    json!({
        "upgrade_id": u.id,
        "version": u.version,
        "sha256": u.sha256,
        "size": u.size,
        "deadline_ms": u.deadline_ms,
        "os": u.os,
        "arch": u.arch,
        "targets": targets_json(&u.targets),
        "created_at_ms": u.created_at_ms,
        "actor": u.actor,
    })
}

/// `POST /v1/artifacts`: the body is the binary. Stored under its SHA-256 (a second
/// upload of the same bytes is a no-op, `200` instead of `201`).
async fn upload(
    req: HttpRequest,
    mut body: web::Payload,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let limit = shared.config.max_artifact_bytes;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad("bad_body", e.to_string()))?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "artifact_too_large",
                format!("artifacts may be at most {limit} bytes (SCHEDULER_MAX_ARTIFACT_BYTES)"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(ApiError::bad(
            "empty_artifact",
            "the body is the artifact; it is empty",
        ));
    }
    let store = artifacts(&shared);
    let size = bytes.len() as u64;
    let sha256 = web::block(move || store.put(&bytes))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let record = ArtifactRecord {
        sha256,
        size,
        uploaded_at_ms: now_ms(),
        actor: actor.name.clone(),
    };
    let (record, new, entry) = blocking(&shared, move |store| {
        store.put_artifact(&record, |a, new| {
            audit::entry(
                &actor,
                audit::ARTIFACT_UPLOAD,
                format!("artifact/{}", a.sha256),
                json!({"size": a.size, "new": new}),
            )
        })
    })
    .await?;
    audit::log(&entry);
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(status).json(artifact_json(&record)))
}

/// `GET /v1/artifacts`: every uploaded artifact.
async fn list_artifacts(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let list = blocking(&shared, |store| store.artifacts()).await?;
    Ok(HttpResponse::Ok().json(json!({
        "artifacts": list.iter().map(artifact_json).collect::<Vec<_>>(),
    })))
}

fn unauthorized(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "agent_token_required", detail)
}

/// `GET /v1/artifacts/{sha256}`: the bytes, for an agent presenting its own token.
async fn download(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let Some(tokens) = shared.config.agent_tokens.as_ref() else {
        return Err(ApiError::unavailable(
            "no agent-token key is configured (SCHEDULER_AGENT_TOKEN_KEY_FILE): agent credentials cannot be checked",
        ));
    };
    let presented = servicekit::http::bearer(&req)
        .ok_or_else(|| unauthorized("downloads need the agent's own token (Bearer)"))?;
    let node = tokens
        .verify(presented)
        .map_err(|e| unauthorized(format!("agent token refused: {e}")))?;
    if shared.trust.is_revoked(&node) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "revoked",
            format!("node {node} is revoked"),
        ));
    }
    let sha256 = path.into_inner();
    if !fleet::is_sha256_hex(&sha256) {
        return Err(ApiError::bad("bad_sha256", "use 64 lowercase hex digits"));
    }
    let (n, s) = (node.clone(), sha256.clone());
    let (registered, known) = blocking(&shared, move |store| {
        Ok((store.is_registered(&n)?, store.artifact(&s)?.is_some()))
    })
    .await?;
    if !registered {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "unknown_agent",
            format!("node {node} is not registered"),
        ));
    }
    if !known {
        return Err(ApiError::not_found(format!("no artifact {sha256}")));
    }
    let store = artifacts(&shared);
    let s = sha256.clone();
    let bytes = web::block(move || store.read(&s))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("the file of artifact {sha256} is missing")))?;
    tracing::info!(%node, %sha256, size = bytes.len(), "Artifact downloaded.");
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(bytes))
}

/// Body of `POST /v1/upgrades`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartUpgrade {
    targets: TargetsRequest,
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

/// `POST /v1/upgrades`: starts an upgrade; targets that are up get the manifest now, the
/// others when they register.
async fn start_upgrade(
    req: HttpRequest,
    body: web::Json<serde_json::Value>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    let actor = authorize(&req, &shared)?;
    let body: StartUpgrade = serde_json::from_value(body.into_inner())
        .map_err(|e| ApiError::bad("malformed_json", e.to_string()))?;
    let new = NewUpgrade {
        sha256: body.sha256,
        version: body.version,
        deadline_ms: body
            .deadline_secs
            .unwrap_or(DEFAULT_DEADLINE_SECS)
            .saturating_mul(1000),
        os: body.os,
        arch: body.arch,
        targets: body.targets.into_targets()?,
        actor: actor.name.clone(),
    };
    let (upgrade, nodes, entry) = blocking(&shared, move |store| {
        store.create_upgrade(&new, now_ms(), |u, nodes| {
            audit::entry(
                &actor,
                audit::UPGRADE_START,
                format!("upgrade/{}", u.id),
                json!({
                    "version": u.version,
                    "sha256": u.sha256,
                    "deadline_ms": u.deadline_ms,
                    "targets": targets_json(&u.targets),
                    "nodes": nodes.iter().map(UserId::as_str).collect::<Vec<_>>(),
                }),
            )
        })
    })
    .await?;
    audit::log(&entry);
    let targets: Vec<String> = nodes.iter().map(|n| n.as_str().to_owned()).collect();
    let pushed =
        crate::upgrades::push_to_up(&shared, nodes.into_iter().collect(), &upgrade).await?;
    let mut out = upgrade_json(&upgrade);
    out["nodes"] = json!(targets);
    out["pushed"] = json!(pushed);
    Ok(HttpResponse::Created().json(out))
}

/// `GET /v1/upgrades`: the newest upgrades.
async fn list_upgrades(
    req: HttpRequest,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let list = blocking(&shared, |store| store.upgrades(MAX_LIST)).await?;
    Ok(HttpResponse::Ok().json(json!({
        "upgrades": list.iter().map(upgrade_json).collect::<Vec<_>>(),
    })))
}

/// `GET /v1/upgrades/{id}`: the upgrade with each target's state and counts per state. A
/// node still `installed` well past its deadline is flagged `overdue` (its agent has not
/// reported back: the machine or its watchdog may be gone).
async fn upgrade_status(
    req: HttpRequest,
    path: web::Path<String>,
    shared: web::Data<Arc<Shared>>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &shared)?;
    let id: u64 = path
        .parse()
        .map_err(|_| ApiError::bad("malformed_id", "an upgrade id is a number"))?;
    let (upgrade, nodes) = blocking(&shared, move |store| store.upgrade(id)).await?;
    let mut counts: BTreeMap<&str, u64> = UpgradeState::NAMES.iter().map(|n| (*n, 0)).collect();
    let now = now_ms();
    // The agent's deadline plus the time a restart and a reconnect may take.
    let overdue_after = upgrade.deadline_ms.saturating_add(60_000);
    let nodes: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            *counts.entry(n.state.as_str()).or_default() += 1;
            let mut v = json!(n);
            v["overdue"] = json!(
                matches!(n.state, UpgradeState::Downloading | UpgradeState::Installed)
                    && now.saturating_sub(n.updated_at_ms) > overdue_after
            );
            v
        })
        .collect();
    let mut out = upgrade_json(&upgrade);
    out["counts"] = json!(counts);
    out["nodes"] = json!(nodes);
    Ok(HttpResponse::Ok().json(out))
}
