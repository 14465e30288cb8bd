//! Agent artifacts and upgrades (the `scheduler_artifact*` and `scheduler_upgrade*`
//! tables): which artifacts were uploaded (their bytes are files named by SHA-256, see
//! [`crate::artifacts`]), each upgrade (artifact, version, deadline, targets) and, per
//! target node, where it stands.
//!
//! A node's state moves forward only: `pending` -> `downloading` -> `installed` ->
//! `online`, or ends in `failed` or `rolled_back`. Agent reports are applied by state, so a
//! replayed report changes nothing; `online` is reached from the agent's `completed` report
//! or from a register with the target version, whichever comes first, and `rolled_back`
//! overrides `online` because the agent's watchdog has the last word (a new binary can
//! register while on trial and still be rolled back). Nodes that have not reached an end
//! state are indexed by node, so a register finds its upgrades without a scan. Each change
//! and its audit entry share one durable transaction.

use std::collections::BTreeSet;

use messages::fleet::{self, UpgradeOutcome};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::operator::append_in;
use super::{
    AuditEntry, META, NewAuditEntry, Store, StoreError, Targets, UserId, decode, encode,
    resolve_targets_in,
};

/// Uploaded artifacts: sha256 -> `ArtifactRow`.
const ARTIFACTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("scheduler_artifacts");
/// Upgrades: id -> `UpgradeRow`.
const UPGRADES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("scheduler_upgrades");
/// Per target: (upgrade id, node id) -> `NodeRow`.
const UPGRADE_NODES: TableDefinition<'_, (u64, &str), &[u8]> =
    TableDefinition::new("scheduler_upgrade_nodes");
/// Targets not in an end state: (node id, upgrade id).
const UPGRADE_ACTIVE: TableDefinition<'_, (&str, u64), ()> =
    TableDefinition::new("scheduler_upgrade_active");

const META_NEXT_UPGRADE_ID: &str = "next_upgrade_id";

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(ARTIFACTS)?;
    txn.open_table(UPGRADES)?;
    txn.open_table(UPGRADE_NODES)?;
    txn.open_table(UPGRADE_ACTIVE)?;
    Ok(())
}

/// An uploaded artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArtifactRecord {
    /// SHA-256, 64 lowercase hex digits (also its file name).
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Unix ms of the (first) upload.
    pub uploaded_at_ms: u64,
    /// Who uploaded it.
    pub actor: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ArtifactRow {
    size: u64,
    uploaded_at_ms: u64,
    actor: String,
}

/// An upgrade as an operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUpgrade {
    /// The artifact (must have been uploaded).
    pub sha256: String,
    /// The version the new binary reports ([`fleet::check_version`]).
    pub version: String,
    /// How long each agent's new binary gets to come online, ms.
    pub deadline_ms: u64,
    /// Platform it is built for, if restricted.
    pub os: Option<String>,
    /// CPU architecture it is built for, if restricted.
    pub arch: Option<String>,
    /// Where it goes.
    pub targets: Targets,
    /// Who started it.
    pub actor: String,
}

/// A stored upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRecord {
    /// Its id, from 1.
    pub id: u64,
    /// Target version.
    pub version: String,
    /// Artifact.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    /// Deadline per node, ms.
    pub deadline_ms: u64,
    /// Platform restriction.
    pub os: Option<String>,
    /// Architecture restriction.
    pub arch: Option<String>,
    /// As requested.
    pub targets: Targets,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Who started it.
    pub actor: String,
}

impl UpgradeRecord {
    /// The manifest pushed to each target (signed by the push).
    pub fn manifest(&self) -> fleet::UpgradeManifest {
        fleet::UpgradeManifest {
            upgrade_id: self.id,
            version: self.version.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            path: fleet::artifact_path(&self.sha256),
            deadline_ms: self.deadline_ms,
            os: self.os.clone(),
            arch: self.arch.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct UpgradeRow {
    version: String,
    sha256: String,
    size: u64,
    deadline_ms: u64,
    os: Option<String>,
    arch: Option<String>,
    targets: Targets,
    created_at_ms: u64,
    actor: String,
}

fn upgrade_of(id: u64, row: UpgradeRow) -> UpgradeRecord {
    UpgradeRecord {
        id,
        version: row.version,
        sha256: row.sha256,
        size: row.size,
        deadline_ms: row.deadline_ms,
        os: row.os,
        arch: row.arch,
        targets: row.targets,
        created_at_ms: row.created_at_ms,
        actor: row.actor,
    }
}

/// Where one node stands with an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeState {
    /// Not yet heard of by the agent (offline nodes get it when they register).
    Pending,
    /// The agent is downloading the artifact.
    Downloading,
    /// Verified and installed; the agent is restarting into it.
    Installed,
    /// The node runs the target version and is online.
    Online,
    /// The new binary did not come online; the previous one was restored.
    RolledBack,
    /// Nothing was installed (see the error).
    Failed,
}

impl UpgradeState {
    /// An end state: no further report changes it (but see `rolled_back` over `online`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UpgradeState::Online | UpgradeState::RolledBack | UpgradeState::Failed
        )
    }

    /// Every state's name, for counts.
    pub const NAMES: [&'static str; 6] = [
        "pending",
        "downloading",
        "installed",
        "online",
        "rolled_back",
        "failed",
    ];

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeState::Pending => "pending",
            UpgradeState::Downloading => "downloading",
            UpgradeState::Installed => "installed",
            UpgradeState::Online => "online",
            UpgradeState::RolledBack => "rolled_back",
            UpgradeState::Failed => "failed",
        }
    }
}

/// One node's status for an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpgradeNodeStatus {
    /// The node.
    pub node_id: String,
    /// Where it stands.
    pub state: UpgradeState,
    /// Why it failed or was rolled back.
    pub error: Option<String>,
    /// The version the node last reported running.
    pub running_version: Option<String>,
    /// Unix ms of the last change.
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeRow {
    state: UpgradeState,
    error: Option<String>,
    running_version: Option<String>,
    updated_at_ms: u64,
}

/// The state an agent report moves a node to from `from`, if it moves it.
fn next_state(
    from: UpgradeState,
    report: &fleet::UpgradeResult,
) -> Option<(UpgradeState, Option<String>)> {
    use UpgradeState as S;
    let to = match report.status {
        UpgradeOutcome::Downloading if from == S::Pending => S::Downloading,
        UpgradeOutcome::Installed if matches!(from, S::Pending | S::Downloading) => S::Installed,
        UpgradeOutcome::Completed if !from.is_final() => {
            if report.running_version != report.version {
                return Some((
                    S::Failed,
                    Some(format!(
                        "the new binary runs and reports version {:?}, not {:?}",
                        report.running_version, report.version
                    )),
                ));
            }
            S::Online
        }
        UpgradeOutcome::RolledBack if from != S::RolledBack && from != S::Failed => S::RolledBack,
        UpgradeOutcome::Failed if !from.is_final() => S::Failed,
        _ => return None,
    };
    Some((to, report.error.clone()))
}

pub(super) fn check_new(new: &NewUpgrade) -> Result<(), StoreError> {
    if !fleet::is_sha256_hex(&new.sha256) {
        return Err(StoreError::InvalidUpgrade(
            "sha256 must be 64 lowercase hex digits".into(),
        ));
    }
    fleet::check_version(&new.version).map_err(|e| StoreError::InvalidUpgrade(e.to_string()))?;
    if !fleet::UPGRADE_DEADLINE_MS.contains(&new.deadline_ms) {
        return Err(StoreError::InvalidUpgrade(format!(
            "deadline must be 1 s to 1 h, not {} ms",
            new.deadline_ms
        )));
    }
    for (what, v) in [("os", &new.os), ("arch", &new.arch)] {
        if let Some(v) = v
            && (v.is_empty()
                || v.len() > 32
                || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(StoreError::InvalidUpgrade(format!(
                "{what} {v:?}: 1 to 32 of A-Z a-z 0-9 _"
            )));
        }
    }
    match &new.targets {
        Targets::Nodes(ids) if ids.is_empty() => {
            Err(StoreError::InvalidUpgrade("no target nodes given".into()))
        }
        Targets::Selector(sel) if sel.is_empty() => {
            Err(StoreError::InvalidUpgrade("label selector is empty".into()))
        }
        _ => Ok(()),
    }
}

/// [`Store::create_upgrade`] inside a transaction, without the audit entry (the caller's
/// transaction has its own: a rollout batch); `new` already checked with [`check_new`].
pub(super) fn create_upgrade_in(
    txn: &WriteTransaction,
    new: &NewUpgrade,
    at_ms: u64,
) -> Result<(UpgradeRecord, BTreeSet<UserId>), StoreError> {
    let size = {
        let table = txn.open_table(ARTIFACTS)?;
        let row: ArtifactRow = match table.get(new.sha256.as_str())? {
            Some(v) => decode(v.value(), "artifact")?,
            None => return Err(StoreError::UnknownArtifact(new.sha256.clone())),
        };
        row.size
    };
    let nodes = resolve_targets_in(txn, &new.targets)?;
    let id = {
        let mut meta = txn.open_table(META)?;
        let id = meta.get(META_NEXT_UPGRADE_ID)?.map_or(1, |v| v.value());
        let next = id
            .checked_add(1)
            .ok_or_else(|| StoreError::InvalidUpgrade("upgrade ids exhausted".into()))?;
        meta.insert(META_NEXT_UPGRADE_ID, next)?;
        id
    };
    let row = UpgradeRow {
        version: new.version.clone(),
        sha256: new.sha256.clone(),
        size,
        deadline_ms: new.deadline_ms,
        os: new.os.clone(),
        arch: new.arch.clone(),
        targets: new.targets.clone(),
        created_at_ms: at_ms,
        actor: new.actor.clone(),
    };
    txn.open_table(UPGRADES)?
        .insert(id, encode(&row, "upgrade")?.as_slice())?;
    let pending = NodeRow {
        state: UpgradeState::Pending,
        error: None,
        running_version: None,
        updated_at_ms: at_ms,
    };
    for node in &nodes {
        put_node(txn, id, node.as_str(), &pending)?;
    }
    Ok((upgrade_of(id, row), nodes))
}

/// Whether an artifact was uploaded (inside a transaction).
pub(super) fn artifact_exists_in(txn: &WriteTransaction, sha256: &str) -> Result<bool, StoreError> {
    Ok(txn.open_table(ARTIFACTS)?.get(sha256)?.is_some())
}

/// Every target of upgrade `id` with its state (inside a transaction).
pub(super) fn node_states_in(
    txn: &WriteTransaction,
    id: u64,
) -> Result<Vec<(String, UpgradeState)>, StoreError> {
    let table = txn.open_table(UPGRADE_NODES)?;
    let mut out = Vec::new();
    for item in table.range((id, "")..)? {
        let (k, v) = item?;
        let (i, node) = k.value();
        if i != id {
            break;
        }
        let row: NodeRow = decode(v.value(), "upgrade node")?;
        out.push((node.to_owned(), row.state));
    }
    Ok(out)
}

/// Ends upgrade `id` for its targets that never heard of it (`pending`): `failed` with
/// `reason`, so a later register does not start it behind a rollout's back. Targets
/// already downloading or installing go on (the agent's watchdog decides). Returns how
/// many were ended.
pub(super) fn fail_pending_in(
    txn: &WriteTransaction,
    id: u64,
    reason: &str,
    at_ms: u64,
) -> Result<u64, StoreError> {
    let mut ended = 0;
    for (node, state) in node_states_in(txn, id)? {
        if state != UpgradeState::Pending {
            continue;
        }
        let row = NodeRow {
            state: UpgradeState::Failed,
            error: Some(reason.to_owned()),
            running_version: None,
            updated_at_ms: at_ms,
        };
        put_node(txn, id, &node, &row)?;
        ended += 1;
    }
    Ok(ended)
}

fn read_upgrade(txn: &WriteTransaction, id: u64) -> Result<UpgradeRecord, StoreError> {
    let table = txn.open_table(UPGRADES)?;
    let row: UpgradeRow = match table.get(id)? {
        Some(v) => decode(v.value(), "upgrade")?,
        None => return Err(StoreError::UnknownUpgrade(id)),
    };
    Ok(upgrade_of(id, row))
}

/// Writes a node's row and keeps the active index in step with it.
fn put_node(txn: &WriteTransaction, id: u64, node: &str, row: &NodeRow) -> Result<(), StoreError> {
    txn.open_table(UPGRADE_NODES)?
        .insert((id, node), encode(row, "upgrade node")?.as_slice())?;
    let mut active = txn.open_table(UPGRADE_ACTIVE)?;
    if row.state.is_final() {
        active.remove((node, id))?;
    } else {
        active.insert((node, id), ())?;
    }
    Ok(())
}

impl Store {
    /// Records an uploaded artifact (its file is already in place), with its audit entry
    /// in the same transaction. An artifact uploaded again keeps its first record; the
    /// returned flag says whether it was new.
    pub fn put_artifact(
        &self,
        artifact: &ArtifactRecord,
        audit: impl FnOnce(&ArtifactRecord, bool) -> NewAuditEntry,
    ) -> Result<(ArtifactRecord, bool, AuditEntry), StoreError> {
        if !fleet::is_sha256_hex(&artifact.sha256) {
            return Err(StoreError::InvalidUpgrade("not a sha256".into()));
        }
        self.write(|txn| {
            let mut table = txn.open_table(ARTIFACTS)?;
            let existing: Option<ArtifactRow> = match table.get(artifact.sha256.as_str())? {
                Some(v) => Some(decode(v.value(), "artifact")?),
                None => None,
            };
            let (record, new) = match existing {
                Some(row) => (
                    ArtifactRecord {
                        sha256: artifact.sha256.clone(),
                        size: row.size,
                        uploaded_at_ms: row.uploaded_at_ms,
                        actor: row.actor,
                    },
                    false,
                ),
                None => {
                    let row = ArtifactRow {
                        size: artifact.size,
                        uploaded_at_ms: artifact.uploaded_at_ms,
                        actor: artifact.actor.clone(),
                    };
                    table.insert(
                        artifact.sha256.as_str(),
                        encode(&row, "artifact")?.as_slice(),
                    )?;
                    (artifact.clone(), true)
                }
            };
            drop(table);
            let entry = append_in(txn, artifact.uploaded_at_ms, audit(&record, new))?;
            Ok((record, new, entry))
        })
    }

    /// An artifact's record, if it was uploaded.
    pub fn artifact(&self, sha256: &str) -> Result<Option<ArtifactRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ARTIFACTS)?;
        let Some(v) = table.get(sha256)? else {
            return Ok(None);
        };
        let row: ArtifactRow = decode(v.value(), "artifact")?;
        Ok(Some(ArtifactRecord {
            sha256: sha256.to_owned(),
            size: row.size,
            uploaded_at_ms: row.uploaded_at_ms,
            actor: row.actor,
        }))
    }

    /// Every artifact, by SHA-256.
    pub fn artifacts(&self) -> Result<Vec<ArtifactRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ARTIFACTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let row: ArtifactRow = decode(v.value(), "artifact")?;
            out.push(ArtifactRecord {
                sha256: k.value().to_owned(),
                size: row.size,
                uploaded_at_ms: row.uploaded_at_ms,
                actor: row.actor,
            });
        }
        Ok(out)
    }

    /// Stores a new upgrade of an uploaded artifact, resolves its targets (every node
    /// starts `pending`) and appends its audit entry, in one transaction.
    pub fn create_upgrade(
        &self,
        new: &NewUpgrade,
        at_ms: u64,
        audit: impl FnOnce(&UpgradeRecord, &BTreeSet<UserId>) -> NewAuditEntry,
    ) -> Result<(UpgradeRecord, BTreeSet<UserId>, AuditEntry), StoreError> {
        check_new(new)?;
        self.write(|txn| {
            let (record, nodes) = create_upgrade_in(txn, new, at_ms)?;
            let entry = append_in(txn, at_ms, audit(&record, &nodes))?;
            Ok((record, nodes, entry))
        })
    }

    /// An upgrade with every target's status.
    pub fn upgrade(&self, id: u64) -> Result<(UpgradeRecord, Vec<UpgradeNodeStatus>), StoreError> {
        let txn = self.db.begin_read()?;
        let row: UpgradeRow = match txn.open_table(UPGRADES)?.get(id)? {
            Some(v) => decode(v.value(), "upgrade")?,
            None => return Err(StoreError::UnknownUpgrade(id)),
        };
        let table = txn.open_table(UPGRADE_NODES)?;
        let mut nodes = Vec::new();
        for item in table.range((id, "")..)? {
            let (k, v) = item?;
            let (i, node) = k.value();
            if i != id {
                break;
            }
            let n: NodeRow = decode(v.value(), "upgrade node")?;
            nodes.push(UpgradeNodeStatus {
                node_id: node.to_owned(),
                state: n.state,
                error: n.error,
                running_version: n.running_version,
                updated_at_ms: n.updated_at_ms,
            });
        }
        Ok((upgrade_of(id, row), nodes))
    }

    /// Every upgrade, newest first, at most `limit`.
    pub fn upgrades(&self, limit: usize) -> Result<Vec<UpgradeRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(UPGRADES)?;
        let mut out = Vec::new();
        for item in table.iter()?.rev().take(limit) {
            let (k, v) = item?;
            out.push(upgrade_of(k.value(), decode(v.value(), "upgrade")?));
        }
        Ok(out)
    }

    /// Applies an agent's report to its node's row. Returns the node's state afterwards, or
    /// `None` when the node is no target of that upgrade (nothing is stored).
    pub fn record_upgrade_result(
        &self,
        node: &UserId,
        report: &fleet::UpgradeResult,
        at_ms: u64,
    ) -> Result<Option<UpgradeState>, StoreError> {
        self.write_if_changed(|txn| {
            let key = (report.upgrade_id, node.as_str());
            let row: Option<NodeRow> = match txn.open_table(UPGRADE_NODES)?.get(key)? {
                Some(v) => Some(decode(v.value(), "upgrade node")?),
                None => None,
            };
            let Some(mut row) = row else {
                return Ok((None, false));
            };
            let Some((to, error)) = next_state(row.state, report) else {
                return Ok((Some(row.state), false));
            };
            row.state = to;
            row.error = error;
            row.running_version = Some(report.running_version.clone());
            row.updated_at_ms = at_ms;
            put_node(txn, report.upgrade_id, node.as_str(), &row)?;
            Ok((Some(to), true))
        })
    }

    /// At a register reporting `version`: marks the node `online` in each unfinished
    /// upgrade to that version, and returns the upgrades still `pending` for it (to push).
    pub fn upgrades_at_register(
        &self,
        node: &UserId,
        version: &str,
        at_ms: u64,
    ) -> Result<Vec<UpgradeRecord>, StoreError> {
        self.write_if_changed(|txn| {
            let ids: Vec<u64> = {
                let active = txn.open_table(UPGRADE_ACTIVE)?;
                active
                    .range((node.as_str(), 0)..=(node.as_str(), u64::MAX))?
                    .map(|item| item.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?
            };
            let mut pending = Vec::new();
            let mut changed = false;
            for id in ids {
                let upgrade = read_upgrade(txn, id)?;
                let row: Option<NodeRow> =
                    match txn.open_table(UPGRADE_NODES)?.get((id, node.as_str()))? {
                        Some(v) => Some(decode(v.value(), "upgrade node")?),
                        None => None,
                    };
                let Some(mut row) = row else { continue };
                if upgrade.version == version {
                    row.state = UpgradeState::Online;
                    row.running_version = Some(version.to_owned());
                    row.updated_at_ms = at_ms;
                    put_node(txn, id, node.as_str(), &row)?;
                    changed = true;
                } else if row.state == UpgradeState::Pending {
                    pending.push(upgrade);
                }
            }
            Ok((pending, changed))
        })
    }

    /// Whether `node` is a registered agent (the artifact download checks its caller).
    pub fn is_registered(&self, node: &UserId) -> Result<bool, StoreError> {
        Ok(self.agent(node)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(status: UpgradeOutcome, running: &str) -> fleet::UpgradeResult {
        fleet::UpgradeResult {
            message_id: "m".into(),
            upgrade_id: 1,
            version: "2.0".into(),
            sha256: String::new(),
            status,
            error: None,
            running_version: running.into(),
            at_ms: 0,
        }
    }

    #[test]
    fn states_only_move_forward_and_the_watchdog_has_the_last_word() {
        use UpgradeOutcome as O;
        use UpgradeState as S;
        let to = |from, status, running| next_state(from, &report(status, running)).map(|t| t.0);
        assert_eq!(to(S::Pending, O::Downloading, "1.0"), Some(S::Downloading));
        assert_eq!(to(S::Installed, O::Downloading, "1.0"), None);
        assert_eq!(to(S::Downloading, O::Installed, "1.0"), Some(S::Installed));
        assert_eq!(to(S::Installed, O::Completed, "2.0"), Some(S::Online));
        assert_eq!(to(S::Installed, O::Completed, "1.0"), Some(S::Failed));
        assert_eq!(to(S::Online, O::RolledBack, "1.0"), Some(S::RolledBack));
        assert_eq!(to(S::RolledBack, O::Completed, "2.0"), None);
        assert_eq!(to(S::Online, O::Failed, "1.0"), None);
        assert_eq!(to(S::Downloading, O::Failed, "1.0"), Some(S::Failed));
    }
}
