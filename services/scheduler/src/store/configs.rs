//! Versioned config documents (the `scheduler_config*` tables): each name has numbered
//! versions (content, SHA-256, optional validate and reload commands), one desired version,
//! the targets its versions go to, and per target node what the agent last reported.
//!
//! A `set` stores the next version, makes it desired and resolves its targets exactly like a
//! task does (listed nodes must be registered; a selector takes the matching registered
//! agents); agents that register later and match a selector join at their register. A
//! rollback only moves the desired version to an older one that is still kept. History is
//! bounded: the newest [`CONFIG_HISTORY`] versions per name are kept, plus the desired one.
//! A `set` with `activate: false` stages a version without making it desired: a staged
//! rollout then moves nodes to it batch by batch.
//!
//! A node may be **pinned** to a version other than the desired one: a config rollout pins
//! each batch's nodes to the version it rolls out, so the rest of the document's nodes keep
//! the desired version until their batch comes; when a rollout that covered every node of
//! the document completes, its version becomes the desired one and the pins go. A `set`
//! that activates a version and a rollback clear every pin (an operator's explicit choice
//! wins), and both are refused while a config rollout of that document is unfinished.
//!
//! Per (name, node) the store keeps the version the agent reports as applied (from its
//! acks and from every register, which says what is on disk now) and its last ack, from
//! which the status of a node follows: `applied` when it runs the desired version,
//! `failed` when its last ack for the desired version failed, `pending` otherwise. Each
//! change and its audit entry share one durable transaction, like tasks.

use std::collections::{BTreeMap, BTreeSet};

use messages::fleet::{self, AppliedConfig};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::operator::append_in;
use super::{
    AgentRecord, AuditEntry, LabelSelector, NewAuditEntry, Store, StoreError, Targets, UserId,
    decode, encode, parse_node, resolve_targets_in,
};

/// Config documents: name -> `ConfigRow`.
const CONFIGS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("scheduler_configs");
/// Their versions: (name, version) -> `VersionRow`.
const CONFIG_VERSIONS: TableDefinition<'_, (&str, u64), &[u8]> =
    TableDefinition::new("scheduler_config_versions");
/// What each target node has: (name, node id) -> `NodeRow`.
const CONFIG_NODES: TableDefinition<'_, (&str, &str), &[u8]> =
    TableDefinition::new("scheduler_config_nodes");

/// Versions kept per name (the desired one is kept too, however old).
pub const CONFIG_HISTORY: u64 = 20;

/// Longest validate or reload command line (arguments).
const MAX_ARGS: usize = 64;

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(CONFIGS)?;
    txn.open_table(CONFIG_VERSIONS)?;
    txn.open_table(CONFIG_NODES)?;
    Ok(())
}

/// A new version as an operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConfigVersion {
    /// The document's name (a safe file name, [`fleet::check_config_name`]).
    pub name: String,
    /// The document.
    pub content: Vec<u8>,
    /// Validate command (argv), run by the agent before replacing the file.
    pub validate: Option<Vec<String>>,
    /// Reload command (argv), run by the agent after replacing the file.
    pub reload: Option<Vec<String>>,
    /// Where it goes.
    pub targets: Targets,
    /// Who made it (the API key's name).
    pub actor: String,
    /// Make it the desired version (and push it) at once; `false` stages it for a rollout.
    pub activate: bool,
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    /// The document's name.
    pub name: String,
    /// Its number, from 1.
    pub version: u64,
    /// SHA-256 of `content`, hex.
    pub sha256: String,
    /// The document.
    pub content: Vec<u8>,
    /// Validate command.
    pub validate: Option<Vec<String>>,
    /// Reload command.
    pub reload: Option<Vec<String>>,
    /// When it was created, unix ms.
    pub created_at_ms: u64,
    /// Who created it.
    pub actor: String,
}

impl ConfigVersion {
    /// The push that carries this version to an agent.
    pub fn push(&self) -> fleet::ConfigPush {
        fleet::ConfigPush {
            name: self.name.clone(),
            version: self.version,
            sha256: self.sha256.clone(),
            content: self.content.clone(),
            validate: self.validate.clone(),
            reload: self.reload.clone(),
        }
    }
}

/// A config document's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRecord {
    /// The name.
    pub name: String,
    /// The version agents should run.
    pub desired: u64,
    /// The newest version created.
    pub latest: u64,
    /// The targets of the latest `set`.
    pub targets: Targets,
    /// The nodes it goes to.
    pub nodes: BTreeSet<UserId>,
    /// Last change, unix ms.
    pub updated_at_ms: u64,
}

/// Where one node stands with a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigState {
    /// It runs the desired version.
    Applied,
    /// It has not (yet) acked the desired version.
    Pending,
    /// Its last attempt at the desired version failed.
    Failed,
}

/// One node's status for a document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigNodeStatus {
    /// The node.
    pub node_id: String,
    /// The version this node should run: the document's desired one, or the version a
    /// rollout pinned it to.
    pub desired_version: u64,
    /// Applied, pending or failed (against the desired version).
    pub state: ConfigState,
    /// The version the node reports as applied.
    pub applied_version: Option<u64>,
    /// SHA-256 of what the node has on disk, as it reported.
    pub applied_sha256: Option<String>,
    /// The error of its last failed attempt at the desired version.
    pub error: Option<String>,
    /// When the node last reported, unix ms.
    pub updated_at_ms: Option<u64>,
}

/// An agent's ack as the store takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewConfigAck<'a> {
    /// The node.
    pub node_id: &'a UserId,
    /// The agent's ack.
    pub ack: &'a fleet::ConfigAck,
}

#[derive(Debug, Serialize, Deserialize)]
struct ConfigRow {
    desired: u64,
    latest: u64,
    targets: Targets,
    updated_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct VersionRow {
    sha256: String,
    #[serde(with = "serde_bytes")]
    content: Vec<u8>,
    validate: Option<Vec<String>>,
    reload: Option<Vec<String>>,
    created_at_ms: u64,
    actor: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NodeRow {
    /// What the agent reports it has: (version, sha256 on disk).
    applied: Option<(u64, String)>,
    /// Its last ack: (version, sha256, failed with this error?).
    last_ack: Option<AckRow>,
    /// When it last reported (ack or register), unix ms.
    updated_at_ms: Option<u64>,
    /// The version a config rollout moved this node to, ahead of the desired one.
    #[serde(default)]
    pinned: Option<u64>,
}

impl NodeRow {
    /// The version this node should run.
    fn wanted(&self, desired: u64) -> u64 {
        self.pinned.unwrap_or(desired)
    }

    /// Whether it runs `version` (number and content).
    fn runs(&self, version: &ConfigVersion) -> bool {
        self.applied
            .as_ref()
            .is_some_and(|(v, sha)| *v == version.version && *sha == version.sha256)
    }

    /// Whether its last attempt at `version` failed.
    fn failed_at(&self, version: &ConfigVersion) -> Option<&AckRow> {
        self.last_ack.as_ref().filter(|a| {
            a.error.is_some() && a.version == version.version && a.sha256 == version.sha256
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AckRow {
    version: u64,
    sha256: String,
    error: Option<String>,
    at_ms: u64,
}

fn version_of(name: &str, version: u64, row: VersionRow) -> ConfigVersion {
    ConfigVersion {
        name: name.to_owned(),
        version,
        sha256: row.sha256,
        content: row.content,
        validate: row.validate,
        reload: row.reload,
        created_at_ms: row.created_at_ms,
        actor: row.actor,
    }
}

fn check_command(what: &str, argv: Option<&Vec<String>>) -> Result<(), StoreError> {
    let Some(argv) = argv else { return Ok(()) };
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(StoreError::InvalidConfig(format!(
            "{what} must name a program"
        )));
    }
    if argv.len() > MAX_ARGS || argv.iter().any(|a| a.contains('\0')) {
        return Err(StoreError::InvalidConfig(format!(
            "{what}: at most {MAX_ARGS} arguments, none with a NUL byte"
        )));
    }
    Ok(())
}

fn validate(new: &NewConfigVersion) -> Result<(), StoreError> {
    fleet::check_config_name(&new.name).map_err(|e| StoreError::InvalidConfig(e.to_string()))?;
    if new.content.len() > fleet::MAX_CONFIG_BYTES {
        return Err(StoreError::InvalidConfig(format!(
            "content is {} bytes; at most {} are allowed",
            new.content.len(),
            fleet::MAX_CONFIG_BYTES
        )));
    }
    check_command("validate", new.validate.as_ref())?;
    check_command("reload", new.reload.as_ref())?;
    match &new.targets {
        Targets::Nodes(ids) if ids.is_empty() => {
            Err(StoreError::InvalidConfig("no target nodes given".into()))
        }
        Targets::Selector(sel) if sel.is_empty() => {
            Err(StoreError::InvalidConfig("label selector is empty".into()))
        }
        _ => Ok(()),
    }
}

fn read_config(txn: &WriteTransaction, name: &str) -> Result<Option<ConfigRow>, StoreError> {
    let table = txn.open_table(CONFIGS)?;
    let row = match table.get(name)? {
        Some(v) => Some(decode(v.value(), "config")?),
        None => None,
    };
    Ok(row)
}

fn read_version(
    txn: &WriteTransaction,
    name: &str,
    version: u64,
) -> Result<ConfigVersion, StoreError> {
    let table = txn.open_table(CONFIG_VERSIONS)?;
    let row: VersionRow = match table.get((name, version))? {
        Some(v) => decode(v.value(), "config version")?,
        None => {
            return Err(StoreError::UnknownConfigVersion {
                name: name.to_owned(),
                version,
            });
        }
    };
    Ok(version_of(name, version, row))
}

/// The nodes that have a row for `name`.
fn nodes_in(txn: &WriteTransaction, name: &str) -> Result<BTreeSet<UserId>, StoreError> {
    let table = txn.open_table(CONFIG_NODES)?;
    let mut nodes = BTreeSet::new();
    for item in table.range((name, "")..)? {
        let (k, _) = item?;
        let (n, node) = k.value();
        if n != name {
            break;
        }
        nodes.insert(parse_node(node)?);
    }
    Ok(nodes)
}

impl Store {
    /// Stores the next version of `new.name`, makes it desired (unless `new.activate` is
    /// false: then it is only kept, for a rollout), resolves its targets (the nodes it goes
    /// to from now on) and appends `audit(version)` to the audit log, in one transaction.
    /// Returns the version, the target nodes and the audit entry.
    pub fn set_config(
        &self,
        new: &NewConfigVersion,
        at_ms: u64,
        audit: impl FnOnce(&ConfigVersion, &BTreeSet<UserId>) -> NewAuditEntry,
    ) -> Result<(ConfigVersion, BTreeSet<UserId>, AuditEntry), StoreError> {
        validate(new)?;
        self.write(|txn| {
            let nodes = resolve_targets_in(txn, &new.targets)?;
            let name = new.name.as_str();
            let head = read_config(txn, name)?;
            if new.activate {
                refuse_during_rollout(txn, name)?;
            } else if head.is_none() {
                return Err(StoreError::InvalidConfig(
                    "the first version of a document is desired at once; stage later ones".into(),
                ));
            }
            let latest = head.as_ref().map_or(0, |c| c.latest);
            let version = latest
                .checked_add(1)
                .ok_or_else(|| StoreError::InvalidConfig("version numbers exhausted".into()))?;
            let desired = match (&head, new.activate) {
                (Some(head), false) => head.desired,
                _ => version,
            };
            let row = VersionRow {
                sha256: fleet::config_sha256(&new.content),
                content: new.content.clone(),
                validate: new.validate.clone(),
                reload: new.reload.clone(),
                created_at_ms: at_ms,
                actor: new.actor.clone(),
            };
            {
                let mut versions = txn.open_table(CONFIG_VERSIONS)?;
                versions.insert((name, version), encode(&row, "config version")?.as_slice())?;
                // Bounded history: the oldest beyond CONFIG_HISTORY go, except the desired
                // version (the new one is the newest, so it always stays).
                let keep_from = version.saturating_sub(CONFIG_HISTORY - 1).max(1);
                let old: Vec<u64> = versions
                    .range((name, 0)..(name, keep_from))?
                    .map(|item| item.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?;
                for v in old.into_iter().filter(|&v| v != desired) {
                    versions.remove((name, v))?;
                }
            }
            let config = ConfigRow {
                desired,
                latest: version,
                targets: new.targets.clone(),
                updated_at_ms: at_ms,
            };
            txn.open_table(CONFIGS)?
                .insert(name, encode(&config, "config")?.as_slice())?;
            // Rows of nodes no longer targeted go; new targets start with nothing known.
            let before = nodes_in(txn, name)?;
            let mut table = txn.open_table(CONFIG_NODES)?;
            for gone in before.difference(&nodes) {
                table.remove((name, gone.as_str()))?;
            }
            for added in nodes.difference(&before) {
                table.insert(
                    (name, added.as_str()),
                    encode(&NodeRow::default(), "config node")?.as_slice(),
                )?;
            }
            drop(table);
            if new.activate {
                unpin_all_in(txn, name)?;
            }
            let created = version_of(name, version, row);
            let entry = append_in(txn, at_ms, audit(&created, &nodes))?;
            Ok((created, nodes, entry))
        })
    }

    /// Makes the kept version `to` of `name` desired again (clearing every rollout pin),
    /// with its audit entry in the same transaction. Returns the version and the nodes it
    /// goes to.
    pub fn rollback_config(
        &self,
        name: &str,
        to: u64,
        at_ms: u64,
        audit: impl FnOnce(&ConfigVersion, u64) -> NewAuditEntry,
    ) -> Result<(ConfigVersion, BTreeSet<UserId>, AuditEntry), StoreError> {
        self.write(|txn| {
            let mut config =
                read_config(txn, name)?.ok_or_else(|| StoreError::UnknownConfig(name.into()))?;
            refuse_during_rollout(txn, name)?;
            let version = read_version(txn, name, to)?;
            let from = config.desired;
            config.desired = to;
            config.updated_at_ms = at_ms;
            txn.open_table(CONFIGS)?
                .insert(name, encode(&config, "config")?.as_slice())?;
            unpin_all_in(txn, name)?;
            let nodes = nodes_in(txn, name)?;
            let entry = append_in(txn, at_ms, audit(&version, from))?;
            Ok((version, nodes, entry))
        })
    }

    /// A document's head, if it exists.
    pub fn config(&self, name: &str) -> Result<Option<ConfigRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let configs = txn.open_table(CONFIGS)?;
        let Some(v) = configs.get(name)? else {
            return Ok(None);
        };
        let row: ConfigRow = decode(v.value(), "config")?;
        let nodes_table = txn.open_table(CONFIG_NODES)?;
        let mut nodes = BTreeSet::new();
        for item in nodes_table.range((name, "")..)? {
            let (k, _) = item?;
            let (n, node) = k.value();
            if n != name {
                break;
            }
            nodes.insert(parse_node(node)?);
        }
        Ok(Some(ConfigRecord {
            name: name.to_owned(),
            desired: row.desired,
            latest: row.latest,
            targets: row.targets,
            nodes,
            updated_at_ms: row.updated_at_ms,
        }))
    }

    /// Every document's head, by name.
    pub fn configs(&self) -> Result<Vec<ConfigRecord>, StoreError> {
        let names: Vec<String> = {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(CONFIGS)?;
            table
                .iter()?
                .map(|item| item.map(|(k, _)| k.value().to_owned()))
                .collect::<Result<_, _>>()?
        };
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(c) = self.config(&name)? {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// One kept version (`None`: the desired one).
    pub fn config_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<ConfigVersion, StoreError> {
        let config = self
            .config(name)?
            .ok_or_else(|| StoreError::UnknownConfig(name.into()))?;
        let version = version.unwrap_or(config.desired);
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONFIG_VERSIONS)?;
        match table.get((name, version))? {
            Some(v) => Ok(version_of(
                name,
                version,
                decode(v.value(), "config version")?,
            )),
            None => Err(StoreError::UnknownConfigVersion {
                name: name.to_owned(),
                version,
            }),
        }
    }

    /// The kept versions of `name`, oldest first.
    pub fn config_history(&self, name: &str) -> Result<Vec<ConfigVersion>, StoreError> {
        if self.config(name)?.is_none() {
            return Err(StoreError::UnknownConfig(name.into()));
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONFIG_VERSIONS)?;
        let mut out = Vec::new();
        for item in table.range((name, 0)..=(name, u64::MAX))? {
            let (k, v) = item?;
            out.push(version_of(
                name,
                k.value().1,
                decode(v.value(), "config version")?,
            ));
        }
        Ok(out)
    }

    /// Every target node of `name` with its state against the version it should run (the
    /// desired one, or the one a rollout pinned it to). Returns the desired version too.
    pub fn config_status(
        &self,
        name: &str,
    ) -> Result<(ConfigVersion, Vec<ConfigNodeStatus>), StoreError> {
        let desired = self.config_version(name, None)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONFIG_NODES)?;
        let versions = txn.open_table(CONFIG_VERSIONS)?;
        let mut pinned: BTreeMap<u64, Option<ConfigVersion>> = BTreeMap::new();
        let mut out = Vec::new();
        for (node, row) in node_rows(&table, name)? {
            let wanted = row.wanted(desired.version);
            let version = if wanted == desired.version {
                Some(&desired)
            } else {
                if let std::collections::btree_map::Entry::Vacant(slot) = pinned.entry(wanted) {
                    let found = match versions.get((name, wanted))? {
                        Some(v) => Some(version_of(
                            name,
                            wanted,
                            decode(v.value(), "config version")?,
                        )),
                        None => None,
                    };
                    slot.insert(found);
                }
                pinned.get(&wanted).and_then(Option::as_ref)
            };
            out.push(node_status(&node, &row, wanted, version));
        }
        Ok((desired, out))
    }

    /// At a register: records what the agent reports it has (`reported`), adds it to the
    /// documents whose selector its labels match, and returns the versions it should run
    /// (desired, or pinned by a rollout) that it lacks (not reported, another version, or a
    /// file whose SHA-256 differs).
    pub fn configs_to_converge(
        &self,
        agent: &AgentRecord,
        reported: &BTreeMap<String, AppliedConfig>,
        at_ms: u64,
    ) -> Result<Vec<ConfigVersion>, StoreError> {
        let node = agent.node_id.as_str();
        self.write(|txn| {
            let heads: Vec<(String, ConfigRow)> = {
                let table = txn.open_table(CONFIGS)?;
                table
                    .iter()?
                    .map(|item| {
                        let (k, v) = item?;
                        Ok((k.value().to_owned(), decode(v.value(), "config")?))
                    })
                    .collect::<Result<_, StoreError>>()?
            };
            let mut lacking = Vec::new();
            for (name, head) in heads {
                let existing: Option<NodeRow> = {
                    let table = txn.open_table(CONFIG_NODES)?;
                    match table.get((name.as_str(), node))? {
                        Some(v) => Some(decode(v.value(), "config node")?),
                        None => None,
                    }
                };
                let joins = matches!(&head.targets, Targets::Selector(sel) if selects(sel, agent));
                let mut row = match existing {
                    Some(row) => row,
                    None if joins => NodeRow::default(),
                    None => continue,
                };
                row.applied = reported.get(&name).map(|a| (a.version, a.sha256.clone()));
                row.updated_at_ms = Some(at_ms);
                txn.open_table(CONFIG_NODES)?.insert(
                    (name.as_str(), node),
                    encode(&row, "config node")?.as_slice(),
                )?;
                let desired = read_version(txn, &name, row.wanted(head.desired))?;
                if !row.runs(&desired) {
                    lacking.push(desired);
                }
            }
            Ok(lacking)
        })
    }

    /// Takes an agent's ack: the node's last ack, and what it has when it applied. An ack
    /// older than what is recorded (a replay) changes nothing. Returns `false` when the node
    /// is not a target of that document (the ack is dropped).
    pub fn record_config_ack(&self, ack: &NewConfigAck<'_>) -> Result<bool, StoreError> {
        Ok(self
            .record_config_acks(std::slice::from_ref(ack))?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// [`Store::record_config_ack`] for a burst of acks in one transaction (one fsync for a
    /// push to thousands of agents acking at once; none when nothing changed). One outcome
    /// per input, in order.
    pub fn record_config_acks(&self, acks: &[NewConfigAck<'_>]) -> Result<Vec<bool>, StoreError> {
        self.write_if_changed(|txn| {
            let mut table = txn.open_table(CONFIG_NODES)?;
            let mut out = Vec::with_capacity(acks.len());
            let mut changed = false;
            for ack in acks {
                let (known, wrote) = ack_in(&mut table, ack)?;
                out.push(known);
                changed |= wrote;
            }
            Ok((out, changed))
        })
    }
}

/// One ack inside a transaction: (the node is a target, something was written).
fn ack_in(
    table: &mut redb::Table<'_, (&'static str, &'static str), &'static [u8]>,
    ack: &NewConfigAck<'_>,
) -> Result<(bool, bool), StoreError> {
    let key = (ack.ack.name.as_str(), ack.node_id.as_str());
    let mut row: NodeRow = match table.get(key)? {
        Some(v) => decode(v.value(), "config node")?,
        None => return Ok((false, false)),
    };
    if row
        .last_ack
        .as_ref()
        .is_some_and(|last| last.at_ms > ack.ack.at_ms)
    {
        return Ok((true, false));
    }
    let failed = ack.ack.status == fleet::ConfigOutcome::Failed;
    if !failed {
        row.applied = Some((ack.ack.version, ack.ack.sha256.clone()));
    }
    row.last_ack = Some(AckRow {
        version: ack.ack.version,
        sha256: ack.ack.sha256.clone(),
        error: if failed {
            Some(ack.ack.error.clone().unwrap_or_else(|| "failed".into()))
        } else {
            None
        },
        at_ms: ack.ack.at_ms,
    });
    row.updated_at_ms = Some(ack.ack.at_ms);
    table.insert(key, encode(&row, "config node")?.as_slice())?;
    Ok((true, true))
}

fn selects(selector: &LabelSelector, agent: &AgentRecord) -> bool {
    !selector.is_empty() && agent.matches(selector)
}

/// A node's status against `wanted` (`version`: that version, if it is still kept).
fn node_status(
    node: &str,
    row: &NodeRow,
    wanted: u64,
    version: Option<&ConfigVersion>,
) -> ConfigNodeStatus {
    let failed = version.and_then(|v| row.failed_at(v));
    let state = match (failed, version) {
        (Some(_), _) => ConfigState::Failed,
        (None, Some(v)) if row.runs(v) => ConfigState::Applied,
        _ => ConfigState::Pending,
    };
    ConfigNodeStatus {
        node_id: node.to_owned(),
        desired_version: wanted,
        state,
        applied_version: row.applied.as_ref().map(|a| a.0),
        applied_sha256: row.applied.as_ref().map(|a| a.1.clone()),
        error: failed.and_then(|a| a.error.clone()),
        updated_at_ms: row.updated_at_ms,
    }
}

/// [`StoreError::ConfigInRollout`] while a config rollout of `name` is unfinished.
fn refuse_during_rollout(txn: &WriteTransaction, name: &str) -> Result<(), StoreError> {
    match super::rollouts::active_config_rollout_in(txn, name)? {
        Some(rollout) => Err(StoreError::ConfigInRollout {
            name: name.to_owned(),
            rollout,
        }),
        None => Ok(()),
    }
}

/// Clears every node's pin of `name`.
fn unpin_all_in(txn: &WriteTransaction, name: &str) -> Result<(), StoreError> {
    let mut table = txn.open_table(CONFIG_NODES)?;
    let pinned: Vec<(String, NodeRow)> = node_rows(&table, name)?
        .into_iter()
        .filter(|(_, row)| row.pinned.is_some())
        .collect();
    for (node, mut row) in pinned {
        row.pinned = None;
        table.insert(
            (name, node.as_str()),
            encode(&row, "config node")?.as_slice(),
        )?;
    }
    Ok(())
}

/// Every node row of `name`, by node id.
fn node_rows(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    name: &str,
) -> Result<Vec<(String, NodeRow)>, StoreError> {
    let mut out = Vec::new();
    for item in table.range((name, "")..)? {
        let (k, v) = item?;
        let (n, node) = k.value();
        if n != name {
            break;
        }
        out.push((node.to_owned(), decode(v.value(), "config node")?));
    }
    Ok(out)
}

/// A config rollout's batch: pins each of `nodes` to `version` of `name` (a node that was
/// not a target of the document becomes one). Returns the version to push.
pub(super) fn pin_in(
    txn: &WriteTransaction,
    name: &str,
    version: u64,
    nodes: &[UserId],
) -> Result<ConfigVersion, StoreError> {
    let pushed = read_version(txn, name, version)?;
    let mut table = txn.open_table(CONFIG_NODES)?;
    for node in nodes {
        let key = (name, node.as_str());
        let mut row: NodeRow = match table.get(key)? {
            Some(v) => decode(v.value(), "config node")?,
            None => NodeRow::default(),
        };
        row.pinned = Some(version);
        table.insert(key, encode(&row, "config node")?.as_slice())?;
    }
    Ok(pushed)
}

/// Counts of a config rollout batch's nodes: (running `version`, failed at it, neither).
pub(super) fn tally_in(
    txn: &WriteTransaction,
    name: &str,
    version: u64,
    nodes: &[UserId],
) -> Result<(u64, u64, u64), StoreError> {
    let Ok(wanted) = read_version(txn, name, version) else {
        // Pruned from history since: nothing can apply it any more.
        return Ok((0, nodes.len() as u64, 0));
    };
    let table = txn.open_table(CONFIG_NODES)?;
    let mut out = (0, 0, 0);
    for node in nodes {
        let row: NodeRow = match table.get((name, node.as_str()))? {
            Some(v) => decode(v.value(), "config node")?,
            None => NodeRow::default(),
        };
        if row.runs(&wanted) {
            out.0 += 1;
        } else if row.failed_at(&wanted).is_some() {
            out.1 += 1;
        } else {
            out.2 += 1;
        }
    }
    Ok(out)
}

/// A batch closed with nodes that do not run `version`: they go back to the desired
/// version (the rollout gave up on them), so an aborted or timed-out batch leaves no node
/// chasing a version nobody is rolling out.
pub(super) fn unpin_unfinished_in(
    txn: &WriteTransaction,
    name: &str,
    version: u64,
    nodes: &[UserId],
) -> Result<(), StoreError> {
    let wanted = read_version(txn, name, version).ok();
    let mut table = txn.open_table(CONFIG_NODES)?;
    for node in nodes {
        let key = (name, node.as_str());
        let Some(mut row) = (match table.get(key)? {
            Some(v) => Some(decode::<NodeRow>(v.value(), "config node")?),
            None => None,
        }) else {
            continue;
        };
        if row.pinned == Some(version) && !wanted.as_ref().is_some_and(|w| row.runs(w)) {
            row.pinned = None;
            table.insert(key, encode(&row, "config node")?.as_slice())?;
        }
    }
    Ok(())
}

/// A config rollout completed over `covered`: when that is every node of the document, its
/// version becomes the desired one and the pins go (nothing changes on the agents: they
/// run it already). A rollout over a subset leaves its nodes pinned. Returns whether the
/// version became desired.
pub(super) fn complete_in(
    txn: &WriteTransaction,
    name: &str,
    version: u64,
    covered: &BTreeSet<UserId>,
    at_ms: u64,
) -> Result<bool, StoreError> {
    let Some(mut config) = read_config(txn, name)? else {
        return Ok(false);
    };
    if !nodes_in(txn, name)?.is_subset(covered) || read_version(txn, name, version).is_err() {
        return Ok(false);
    }
    config.desired = version;
    config.updated_at_ms = at_ms;
    txn.open_table(CONFIGS)?
        .insert(name, encode(&config, "config")?.as_slice())?;
    unpin_all_in(txn, name)?;
    Ok(true)
}

/// Checks that a config rollout of `version` of `name` can start.
pub(super) fn check_rollout_in(
    txn: &WriteTransaction,
    name: &str,
    version: u64,
) -> Result<(), StoreError> {
    read_config(txn, name)?.ok_or_else(|| StoreError::UnknownConfig(name.into()))?;
    read_version(txn, name, version)?;
    refuse_during_rollout(txn, name)
}
