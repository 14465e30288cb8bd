//! Agent upgrades on the bus: each target that is up gets a signed `agent.upgrade` push
//! carrying the manifest ([`messages::fleet::UpgradeManifest`]; the command signature covers
//! it), agents answer with outboxed `agent.upgrade.result` reports, and a register settles
//! what it can: a node that registers with the target version is `online`, and one that
//! was offline when the upgrade started gets its manifest then.
//!
//! The durable side is the store's (`store::upgrades`), the bytes are in
//! [`crate::artifacts`], the HTTP side in the API module. A lost push needs no timer: the
//! node stays `pending` and its next register re-sends the manifest.

use messages::UserId;
use messages::fleet;
use servicekit::clock::now_ms;

use crate::Shared;
use crate::bus::{BusError, blocking, push};
use crate::store::{UpgradeRecord, UpgradeState};

/// Pushes `upgrade` to each of `nodes` that is up; returns how many pushes went out. A
/// failed push is logged: the node stays pending and gets it at its next register.
pub(crate) async fn push_to_up(
    shared: &Shared,
    nodes: Vec<UserId>,
    upgrade: &UpgradeRecord,
) -> Result<u64, BusError> {
    let sent = crate::bus::push_to_up(
        shared,
        nodes,
        fleet::down::UPGRADE,
        &upgrade.manifest(),
        &shared.metrics.upgrade_pushes,
    )
    .await?;
    Ok(sent)
}

/// At a register: marks upgrades to the version the agent reports `online`, and pushes the
/// ones still pending for it.
pub(crate) async fn at_register(
    shared: &Shared,
    node: &UserId,
    version: String,
) -> Result<(), BusError> {
    let n = node.clone();
    let pending = blocking(shared, move |store| {
        store.upgrades_at_register(&n, &version, now_ms())
    })
    .await?;
    for upgrade in pending {
        tracing::info!(%node, upgrade_id = upgrade.id, version = %upgrade.version, "Pushing a pending upgrade.");
        push(
            shared,
            node,
            fleet::down::UPGRADE,
            &upgrade.manifest(),
            None,
        )
        .await?;
        shared.metrics.upgrade_pushes.inc();
    }
    Ok(())
}

/// Stores an agent's upgrade report and acknowledges it (so the agent clears its outbox).
pub(crate) async fn result(
    shared: &Shared,
    node: UserId,
    report: fleet::UpgradeResult,
) -> Result<(), BusError> {
    if report.message_id.is_empty() || report.message_id.len() > crate::store::MAX_MESSAGE_ID_LEN {
        return Err(BusError::BadMessage(
            "upgrade report without a usable message id".into(),
        ));
    }
    let (n, r) = (node.clone(), report.clone());
    let state = blocking(shared, move |store| {
        store.record_upgrade_result(&n, &r, now_ms())
    })
    .await?;
    let error = report.error.as_deref().unwrap_or("");
    match state {
        None => {
            tracing::warn!(%node, upgrade_id = report.upgrade_id, "Upgrade report for an upgrade this node is not a target of; dropped.");
        }
        Some(s @ (UpgradeState::Failed | UpgradeState::RolledBack)) => tracing::warn!(
            %node,
            upgrade_id = report.upgrade_id,
            state = s.as_str(),
            %error,
            running = %report.running_version,
            "Upgrade did not take."
        ),
        Some(s) => tracing::info!(
            %node,
            upgrade_id = report.upgrade_id,
            state = s.as_str(),
            running = %report.running_version,
            "Upgrade progress."
        ),
    }
    shared.metrics.upgrade_results.inc();
    push(
        shared,
        &node,
        fleet::down::ACK,
        &fleet::Ack {
            message_ids: vec![report.message_id],
        },
        None,
    )
    .await
}
