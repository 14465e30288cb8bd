//! Config push on the bus: versioned documents go to their target agents as signed
//! `agent.config` pushes ([`messages::fleet::ConfigPush`]), agents answer with outboxed
//! `agent.config.ack`s, and a (re)registering agent gets every desired version it reports
//! lacking, so one that was offline, restarted or whose file drifted converges.
//!
//! The durable side (versions, desired version, per-node state) is the store's
//! (`store::configs`); the HTTP side is in the API module. A lost push needs no timer:
//! the node stays `pending`, and its next register re-sends what it lacks.

use std::collections::BTreeMap;

use messages::UserId;
use messages::fleet::{self, AppliedConfig};
use servicekit::clock::now_ms;

use crate::Shared;
use crate::bus::{BusError, blocking, push};
use crate::store::{AgentRecord, ConfigVersion, NewConfigAck};

/// Pushes `version` to each of `nodes` that is up; the others get it when they register.
/// Returns how many pushes went out. A failed push is logged, not fatal: the node stays
/// pending and converges at its next register.
pub(crate) async fn push_to_up(
    shared: &Shared,
    nodes: Vec<UserId>,
    version: &ConfigVersion,
) -> Result<u64, BusError> {
    let sent = crate::bus::push_to_up(
        shared,
        nodes,
        fleet::down::CONFIG,
        &version.push(),
        &shared.metrics.config_pushes,
    )
    .await?;
    Ok(sent)
}

/// At a register: records what the agent has and pushes each desired version it lacks.
pub(crate) async fn converge(
    shared: &Shared,
    agent: AgentRecord,
    reported: BTreeMap<String, AppliedConfig>,
) -> Result<(), BusError> {
    let node = agent.node_id.clone();
    let lacking = blocking(shared, move |store| {
        store.configs_to_converge(&agent, &reported, now_ms())
    })
    .await?;
    for version in lacking {
        tracing::info!(%node, name = %version.name, version = version.version, "Config drifted or missing; pushing the desired version.");
        push(shared, &node, fleet::down::CONFIG, &version.push(), None).await?;
        shared.metrics.config_pushes.inc();
    }
    Ok(())
}

/// Takes a burst of agents' acks in one transaction (a push to thousands of agents comes
/// back as thousands of acks at once) and acknowledges each agent's outbox messages with
/// one push per agent. Acks without a usable message id are dropped with a warning; if the
/// store fails, nothing is acknowledged and the agents replay.
pub(crate) async fn ack_many(shared: &Shared, acks: Vec<(UserId, fleet::ConfigAck)>) {
    let acks: Vec<(UserId, fleet::ConfigAck)> = acks
        .into_iter()
        .filter(|(node, a)| {
            let usable =
                !a.message_id.is_empty() && a.message_id.len() <= crate::store::MAX_MESSAGE_ID_LEN;
            if !usable {
                shared.metrics.bus_errors.inc();
                tracing::warn!(%node, name = %a.name, "Config ack without a usable message id; dropped.");
            }
            usable
        })
        .collect();
    if acks.is_empty() {
        return;
    }
    let rows = acks.clone();
    let known = blocking(shared, move |store| {
        let batch: Vec<NewConfigAck<'_>> = rows
            .iter()
            .map(|(node_id, ack)| NewConfigAck { node_id, ack })
            .collect();
        store.record_config_acks(&batch)
    })
    .await;
    let known = match known {
        Ok(known) => known,
        Err(e) => {
            shared.metrics.bus_errors.inc();
            tracing::warn!(acks = acks.len(), error = %e, "Storing config acks failed; the agents will replay them.");
            return;
        }
    };
    let mut per_node: BTreeMap<UserId, Vec<String>> = BTreeMap::new();
    for ((node, ack), known) in acks.into_iter().zip(known) {
        match (known, ack.status) {
            (false, _) => {
                tracing::warn!(%node, name = %ack.name, "Config ack for a document this node is not a target of; dropped.");
            }
            (true, fleet::ConfigOutcome::Applied) => {
                tracing::debug!(%node, name = %ack.name, version = ack.version, "Config applied.");
            }
            (true, fleet::ConfigOutcome::Failed) => tracing::warn!(
                %node,
                name = %ack.name,
                version = ack.version,
                error = ack.error.as_deref().unwrap_or(""),
                "Config failed to apply."
            ),
        }
        shared.metrics.config_acks.inc();
        per_node.entry(node).or_default().push(ack.message_id);
    }
    for (node, message_ids) in per_node {
        if let Err(e) = push(
            shared,
            &node,
            fleet::down::ACK,
            &fleet::Ack { message_ids },
            None,
        )
        .await
        {
            shared.metrics.bus_errors.inc();
            tracing::warn!(%node, error = %e, "Acknowledging config acks failed.");
        }
    }
}
