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
use crate::bus::{BusError, blocking, is_up, push};
use crate::store::{AgentRecord, ConfigVersion, NewConfigAck};

/// Pushes `version` to each of `nodes` that is up; the others get it when they register.
/// Returns how many pushes went out. A failed push is logged, not fatal: the node stays
/// pending and converges at its next register.
pub async fn push_to_up(
    shared: &Shared,
    nodes: Vec<UserId>,
    version: &ConfigVersion,
) -> Result<u64, BusError> {
    let up = blocking(shared, move |store| {
        let mut up = Vec::new();
        for node in nodes {
            if store.agent(&node)?.is_some_and(|a| is_up(a.state)) {
                up.push(node);
            }
        }
        Ok(up)
    })
    .await?;
    let message = version.push();
    let mut sent = 0;
    for node in up {
        match push(shared, &node, fleet::down::CONFIG, &message, None).await {
            Ok(()) => {
                sent += 1;
                shared.metrics.config_pushes.inc();
            }
            Err(e) => {
                tracing::warn!(%node, name = %version.name, version = version.version, error = %e, "Config push failed.");
            }
        }
    }
    Ok(sent)
}

/// At a register: records what the agent has and pushes each desired version it lacks.
pub async fn converge(
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

/// Stores an agent's config ack and acknowledges it (so the agent clears its outbox).
pub async fn ack(shared: &Shared, node: UserId, ack: fleet::ConfigAck) -> Result<(), BusError> {
    if ack.message_id.is_empty() || ack.message_id.len() > crate::store::MAX_MESSAGE_ID_LEN {
        return Err(BusError::BadMessage(
            "config ack without a usable message id".into(),
        ));
    }
    let (n, a) = (node.clone(), ack.clone());
    let known = blocking(shared, move |store| {
        store.record_config_ack(&NewConfigAck {
            node_id: &n,
            ack: &a,
        })
    })
    .await?;
    match (known, ack.status) {
        (false, _) => {
            tracing::warn!(%node, name = %ack.name, "Config ack for a document this node is not a target of; dropped.");
        }
        (true, fleet::ConfigOutcome::Applied) => {
            tracing::info!(%node, name = %ack.name, version = ack.version, "Config applied.");
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
    push(
        shared,
        &node,
        fleet::down::ACK,
        &fleet::Ack {
            message_ids: vec![ack.message_id],
        },
        None,
    )
    .await
}
