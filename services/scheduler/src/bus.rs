//! The scheduler's side of the bus: consumers of agent traffic (queue group `scheduler`),
//! the pushes to agents (tasks, cancels, acks; config documents in [`crate::configs`]), state-change events, and the periodic sweep
//! that marks silent agents offline and expires overdue task attempts.
//!
//! Every store call runs on a blocking thread. Each subscription is consumed in order by
//! one task, so one agent's messages are applied in the order the bus delivered them.

use servicekit::clock::now_ms;
use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::{Message, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use messages::envelope::{AgentClose, EnvelopeError, PushEnvelope, UpstreamEnvelope};
use messages::fleet::{self, AgentState as WireState};
use messages::frame::RouteError;
use messages::payload::{self, GatewayControl, HeartbeatBatch, PayloadError, SessionEvent};
use messages::subject::{self, Event, Subject};
use messages::{BodyCodec, ClientKind, CloseCode, UserId, headers};
use messages::{Route, SocketId, TraceContext};
use serde::Serialize;
use servicekit::telemetry::{MessageSpan, Operation};

use crate::Shared;
use crate::store::{
    AgentRecord, AgentState, Heartbeat, Ingest, NewResult, ResultBody, StoreError, TargetState,
    TaskId, TaskKind, TaskSpec,
};

/// Why handling one bus message or one push failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A body could not be encoded or decoded.
    #[error("payload: {0}")]
    Payload(#[from] PayloadError),
    /// The message's headers are not the envelope its subject calls for.
    #[error("headers: {0}")]
    Envelope(#[from] EnvelopeError),
    /// A push route is not a valid route.
    #[error("route: {0}")]
    Route(#[from] RouteError),
    /// Publishing failed.
    #[error("publish: {0}")]
    Publish(String),
    /// Subscribing failed.
    #[error("subscribe: {0}")]
    Subscribe(String),
    /// A blocking store call panicked or was cancelled.
    #[error("blocking task: {0}")]
    Join(String),
    /// The message lacks something the contract requires.
    #[error("bad message: {0}")]
    BadMessage(String),
}

/// Runs a store call on a blocking thread.
pub(crate) async fn blocking<T, F>(shared: &Shared, f: F) -> Result<T, BusError>
where
    T: Send + 'static,
    F: FnOnce(&crate::store::Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = Arc::clone(&shared.store);
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| BusError::Join(e.to_string()))?
        .map_err(BusError::from)
}

/// The wire form of a stored agent state.
pub(crate) fn wire_state(s: AgentState) -> WireState {
    match s {
        AgentState::Online => WireState::Online,
        AgentState::Degraded => WireState::Degraded,
        AgentState::Offline => WireState::Offline,
    }
}

/// Stored task kind from the wire kind; the agent-side timeout lives in the kind.
pub(crate) fn store_kind(kind: &fleet::TaskKind, timeout_ms: u64) -> TaskKind {
    match kind.clone() {
        fleet::TaskKind::Command { argv, env, cwd } => TaskKind::Command {
            argv,
            env,
            cwd,
            timeout_ms,
        },
        fleet::TaskKind::TcpProbe { target } => TaskKind::TcpProbe { target, timeout_ms },
        fleet::TaskKind::HttpProbe { url } => TaskKind::HttpProbe { url, timeout_ms },
    }
}

/// Wire task kind and agent-side timeout from the stored kind.
pub(crate) fn wire_kind(kind: &TaskKind) -> (fleet::TaskKind, u64) {
    match kind.clone() {
        TaskKind::Command {
            argv,
            env,
            cwd,
            timeout_ms,
        } => (fleet::TaskKind::Command { argv, env, cwd }, timeout_ms),
        TaskKind::TcpProbe { target, timeout_ms } => {
            (fleet::TaskKind::TcpProbe { target }, timeout_ms)
        }
        TaskKind::HttpProbe { url, timeout_ms } => (fleet::TaskKind::HttpProbe { url }, timeout_ms),
    }
}

/// Subscribes the consumers (before returning, so nothing published after start-up is
/// missed), asks the gateways to re-announce their sessions, and starts the sweep.
pub(crate) async fn start(
    runtime: &tokio::runtime::Runtime,
    shared: &Arc<Shared>,
) -> Result<(), BusError> {
    let setup = Arc::clone(shared);
    let (events, upstream, stats) = runtime
        .spawn(async move {
            let queue = subject::QUEUE_SCHEDULER.to_owned();
            let events = setup
                .client
                .queue_subscribe(subject::event_wildcard(ClientKind::Agent), queue.clone())
                .await
                .map_err(|e| BusError::Subscribe(e.to_string()))?;
            let upstream = setup
                .client
                .queue_subscribe(subject::upstream_wildcard(ClientKind::Agent), queue)
                .await
                .map_err(|e| BusError::Subscribe(e.to_string()))?;
            // Not a queue group: every instance keeps its own view of the gateway tier.
            let stats = setup
                .client
                .subscribe(subject::gateway_stats_wildcard())
                .await
                .map_err(|e| BusError::Subscribe(e.to_string()))?;
            // The socket map is memory only: after a (re)start, have every gateway announce
            // its sessions again so heartbeat batches can be attributed.
            let body = payload::to_bus(&GatewayControl::Resync { sockets: vec![] })?;
            setup
                .client
                .publish(subject::control_all(), Bytes::from(body))
                .await
                .map_err(|e| BusError::Publish(e.to_string()))?;
            setup
                .client
                .flush()
                .await
                .map_err(|e| BusError::Publish(e.to_string()))?;
            Ok::<_, BusError>((events, upstream, stats))
        })
        .await
        .map_err(|e| BusError::Join(e.to_string()))??;
    runtime.spawn(consume(Arc::clone(shared), events));
    runtime.spawn(consume(Arc::clone(shared), upstream));
    runtime.spawn(sweep(Arc::downgrade(shared)));
    runtime.spawn(crate::gateways::consume(Arc::downgrade(shared), stats));
    Ok(())
}

/// Most messages taken off the subscription in one go.
const MAX_BURST: usize = 1024;

/// Handles agent traffic in arrival order. Whatever has already arrived is taken as a burst
/// and consecutive results in it are stored in one transaction: a task fanned out to
/// thousands of agents finishes in a burst, and one fsync per result would bound ingestion
/// at the disk's sync rate.
async fn consume(shared: Arc<Shared>, mut sub: Subscriber) {
    while let Some(first) = sub.next().await {
        let mut burst = vec![first];
        while burst.len() < MAX_BURST {
            match sub.next().now_or_never() {
                Some(Some(msg)) => burst.push(msg),
                _ => break,
            }
        }
        let mut progress = Progress::default();
        for msg in burst {
            // Tunnel frames only move bytes between memory queues: handled at once, never
            // behind the store writes of the burst.
            if let Some(done) = tunnel_frame(&shared, &msg) {
                if let Err(e) = done {
                    failed(&shared, &msg, &e);
                }
                continue;
            }
            let hop = servicekit::telemetry::on_receive(&msg, &shared.metrics.hops);
            match as_progress(&msg) {
                // Kept in the node's outbox until it is enrolled again (not acknowledged).
                Some(Ok(
                    Report::Started(ref node, _)
                    | Report::Result(ref node, _)
                    | Report::ConfigAck(ref node, _),
                )) if shared.trust.is_revoked(node) => {
                    shared.metrics.revoked_dropped.inc();
                    continue;
                }
                Some(Ok(Report::Started(node, started))) => {
                    progress.started.push((node, started, hop));
                    continue;
                }
                Some(Ok(Report::Result(node, result))) => {
                    progress.results.push(Incoming {
                        node,
                        result,
                        _hop: hop,
                    });
                    continue;
                }
                Some(Ok(Report::ConfigAck(node, ack))) => {
                    progress.config_acks.push((node, ack));
                    continue;
                }
                Some(Err(e)) => {
                    failed(&shared, &msg, &e);
                    continue;
                }
                None => {}
            }
            // Everything else is handled after the progress before it, in order.
            store_progress(&shared, std::mem::take(&mut progress)).await;
            if let Err(e) = handle(&shared, &msg).await {
                failed(&shared, &msg, &e);
            }
        }
        store_progress(&shared, progress).await;
    }
}

/// `Some` when `msg` is an agent's tunnel frame: routed to its stream, or why it was not.
fn tunnel_frame(shared: &Shared, msg: &Message) -> Option<Result<(), BusError>> {
    let Ok(Subject::Upstream { route, .. }) = Subject::parse(msg.subject.as_str()) else {
        return None;
    };
    let route = route.as_str();
    if !crate::tunnel::is_tunnel_route(route) {
        return None;
    }
    Some(upstream(route, msg).and_then(|up| {
        crate::tunnel::on_upstream(shared, &up.node, route, &up.body).map_err(BusError::from)
    }))
}

fn failed(shared: &Shared, msg: &Message, e: &BusError) {
    shared.metrics.bus_errors.inc();
    let trace_id = msg
        .headers
        .as_ref()
        .and_then(TraceContext::extract)
        .map(|t| t.trace_id_hex())
        .unwrap_or_default();
    tracing::warn!(subject = %msg.subject, error = %e, %trace_id, "Handling agent traffic failed.");
}

async fn handle(shared: &Shared, msg: &Message) -> Result<(), BusError> {
    match Subject::parse(msg.subject.as_str()) {
        Ok(Subject::Event { event, .. }) => handle_event(shared, event, msg).await,
        Ok(Subject::Upstream { route, .. }) => handle_upstream(shared, route.as_str(), msg).await,
        _ => Ok(()),
    }
}

async fn handle_event(shared: &Shared, event: Event, msg: &Message) -> Result<(), BusError> {
    match event {
        // Connect only teaches us the socket; the agent counts once it registers.
        Event::Connect => {
            let e: SessionEvent = payload::from_bus(&msg.payload)?;
            shared.remember_via(e.socket_id, e.via.clone());
            shared.remember_socket(e.socket_id, e.user_id.clone());
            // The register (another subscription) may have been handled first and found no
            // `via` yet: the connect sets it too, so either order ends with this socket's.
            let node = e.user_id;
            blocking(shared, move |store| {
                store.set_agent_via(&node, e.via.as_ref())
            })
            .await?;
            Ok(())
        }
        Event::Disconnect => {
            let e: SessionEvent = payload::from_bus(&msg.payload)?;
            shared.remember_via(e.socket_id, None);
            // A quick reconnect may already have a new socket (events can be reordered):
            // only the last socket going away makes the agent offline.
            if shared.forget_socket(e.socket_id, &e.user_id) {
                return Ok(());
            }
            shared.trust.forget(&e.user_id);
            shared.tunnels.gone(&e.user_id);
            set_offline(shared, e.user_id, e.at_ms).await
        }
        Event::Heartbeat => {
            let batch: HeartbeatBatch = payload::from_bus(&msg.payload)?;
            heartbeats(shared, &batch).await
        }
        _ => Ok(()),
    }
}

async fn set_offline(shared: &Shared, node: UserId, at_ms: u64) -> Result<(), BusError> {
    let n = node.clone();
    let old = blocking(shared, move |store| {
        store.set_agent_state(&n, AgentState::Offline)
    })
    .await?;
    if let Some(old) = old {
        announce(shared, &node, Some(old), AgentState::Offline, at_ms).await?;
    }
    Ok(())
}

async fn heartbeats(shared: &Shared, batch: &HeartbeatBatch) -> Result<(), BusError> {
    let seen: Vec<(UserId, u64)> = batch
        .seen
        .iter()
        .filter_map(|(socket, at)| shared.node_of(*socket).map(|n| (n, *at)))
        .collect();
    if seen.is_empty() {
        return Ok(());
    }
    let outcome = blocking(shared, move |store| {
        // A heartbeat keeps a degraded agent degraded: only a status message changes that.
        let mut beats = Vec::with_capacity(seen.len());
        for (node_id, at_ms) in seen {
            if let Some(rec) = store.agent(&node_id)? {
                beats.push(Heartbeat {
                    degraded: rec.state == AgentState::Degraded,
                    node_id,
                    at_ms,
                });
            }
        }
        store.touch_many(&beats)
    })
    .await?;
    for (node, old, new) in outcome.changes {
        announce(shared, &node, Some(old), new, batch.at_ms).await?;
        if old == AgentState::Offline {
            // Back from offline: hand it what waited meanwhile.
            dispatch_pending(shared, &node).await?;
        }
    }
    Ok(())
}

/// Largest body an agent frame may inflate to (results carry output tails, batches carry
/// many reports; 16 MiB is far above both).
const MAX_INFLATED_BODY: usize = 16 << 20;

/// An agent's frame as the gateway forwarded it: the node (from the verified token), the
/// socket it came from, the body (inflated if the agent compressed it) and its codec.
struct Upstream<'a> {
    node: UserId,
    socket: SocketId,
    body: std::borrow::Cow<'a, [u8]>,
    codec: BodyCodec,
}

fn upstream<'a>(route: &str, msg: &'a Message) -> Result<Upstream<'a>, BusError> {
    let map = msg
        .headers
        .as_ref()
        .ok_or_else(|| BusError::BadMessage("no headers".into()))?;
    // The gateway sets ws-user from the verified token: it is the node id.
    let envelope = UpstreamEnvelope::from_headers(map)?;
    let node = envelope.origin.user_id;
    // Agents compress large bodies end to end; inflate with a bound so a small frame cannot
    // expand without limit.
    let body = if envelope.compressed {
        std::borrow::Cow::Owned(
            messages::compress::inflate(&msg.payload, MAX_INFLATED_BODY).map_err(|e| {
                BusError::BadMessage(format!("compressed {route} from {node}: {e}"))
            })?,
        )
    } else {
        std::borrow::Cow::Borrowed(&msg.payload[..])
    };
    Ok(Upstream {
        node,
        socket: envelope.origin.socket_id,
        body,
        codec: envelope.codec,
    })
}

/// Task progress and config acks from an agent: stored in bursts, not one transaction per
/// message.
enum Report {
    Started(UserId, fleet::TaskStarted),
    Result(UserId, fleet::TaskResult),
    ConfigAck(UserId, fleet::ConfigAck),
}

/// `Some` when `msg` is task progress (`started` or a result): decoded, or why it could
/// not be.
fn as_progress(msg: &Message) -> Option<Result<Report, BusError>> {
    let Ok(Subject::Upstream { route, .. }) = Subject::parse(msg.subject.as_str()) else {
        return None;
    };
    let route = route.as_str();
    if route != fleet::up::RESULT && route != fleet::up::STARTED && route != fleet::up::CONFIG_ACK {
        return None;
    }
    Some(upstream(route, msg).and_then(|up| {
        Ok(match route {
            fleet::up::RESULT => Report::Result(up.node, payload::decode_body(up.codec, &up.body)?),
            fleet::up::STARTED => {
                Report::Started(up.node, payload::decode_body(up.codec, &up.body)?)
            }
            _ => Report::ConfigAck(up.node, payload::decode_body(up.codec, &up.body)?),
        })
    }))
}

/// The task progress of one burst, in arrival order per kind. Storing every `started`
/// before every result keeps each agent's order: an agent sends `started` before its
/// result on the same connection.
#[derive(Default)]
struct Progress {
    started: Vec<(UserId, fleet::TaskStarted, Option<MessageSpan>)>,
    results: Vec<Incoming>,
    config_acks: Vec<(UserId, fleet::ConfigAck)>,
}

async fn store_progress(shared: &Shared, progress: Progress) {
    if !progress.started.is_empty() {
        let rows: Vec<(TaskId, UserId, u64)> = progress
            .started
            .iter()
            .map(|(node, s, _)| (s.task_id, node.clone(), s.at_ms))
            .collect();
        let outcome = blocking(shared, move |store| {
            let rows: Vec<(TaskId, &UserId, u64)> =
                rows.iter().map(|(t, n, at)| (*t, n, *at)).collect();
            store.mark_running_many(&rows)
        })
        .await;
        match outcome {
            // A late or repeated "started" (after a result, cancel or expiry) is harmless.
            Ok(outcomes) => {
                for ((node, s, _), e) in progress.started.iter().zip(outcomes) {
                    if let Err(e) = e {
                        tracing::debug!(%node, task_id = s.task_id, error = %e, "Ignored a task.started.");
                    }
                }
            }
            Err(e) => {
                shared.metrics.bus_errors.inc();
                tracing::warn!(error = %e, "Storing task.started failed.");
            }
        }
    }
    store_results(shared, progress.results).await;
    if !progress.config_acks.is_empty() {
        crate::configs::ack_many(shared, progress.config_acks).await;
    }
}

async fn handle_upstream(shared: &Shared, route: &str, msg: &Message) -> Result<(), BusError> {
    let Upstream {
        node,
        socket,
        body,
        codec,
    } = upstream(route, msg)?;
    let body = &body[..];
    // A revoked node is heard only to be closed again: nothing it sends is stored or
    // acknowledged, so its outbox keeps every result until it is enrolled again.
    if route != fleet::up::REGISTER && shared.trust.is_revoked(&node) {
        shared.metrics.revoked_dropped.inc();
        return Ok(());
    }
    match route {
        fleet::up::REGISTER => {
            shared.remember_socket(socket, node.clone());
            let via = shared.via_of(socket);
            register(
                shared,
                node.clone(),
                via.clone(),
                payload::decode_body(codec, body)?,
            )
            .await?;
            // The connect event (another subscription) may have come between the read above
            // and the register's write, when there was no record yet to tag: look again.
            let now = shared.via_of(socket);
            if now != via {
                blocking(shared, move |store| {
                    store.set_agent_via(&node, now.as_ref())
                })
                .await?;
            }
            Ok(())
        }
        fleet::up::STATUS => status(shared, node, payload::decode_body(codec, body)?).await,
        fleet::up::REFUSED => refused(shared, node, payload::decode_body(codec, body)?).await,
        fleet::up::REPORT => reports(shared, node, payload::decode_body(codec, body)?).await,
        fleet::up::UPGRADE_RESULT => {
            crate::upgrades::result(shared, node, payload::decode_body(codec, body)?).await
        }
        // `started`, results and config acks are taken out earlier and stored in bursts.
        fleet::up::OUTPUT => {
            let chunk: fleet::TaskOutput = payload::decode_body(codec, body)?;
            shared.output.push(node, chunk);
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn register(
    shared: &Shared,
    node: UserId,
    via: Option<UserId>,
    reg: fleet::Register,
) -> Result<(), BusError> {
    shared.metrics.registers.inc();
    if shared.trust.is_revoked(&node) {
        tracing::warn!(%node, "A revoked node connected; closing it.");
        return close_agent(shared, &node, CloseCode::Revoked).await;
    }
    if reg.node_id != node.as_str() {
        tracing::warn!(%node, claimed = %reg.node_id, "Register names another node; using the token's.");
    }
    let now = now_ms();
    let n = node.clone();
    let reported = reg.configs;
    let version = reg.version.clone();
    let (old, record) = blocking(shared, move |store| {
        let registered_at_ms = store
            .agent(&n)?
            .map_or(now, |existing| existing.registered_at_ms);
        // What the operator pinned wins over what the agent says about itself.
        let mut labels = reg.labels;
        labels.extend(store.pinned_labels(&n)?);
        let record = AgentRecord {
            node_id: n,
            hostname: reg.hostname,
            version: reg.version,
            labels,
            addresses: reg.addresses,
            registered_at_ms,
            last_seen_ms: now,
            state: AgentState::Online,
            via,
        };
        Ok((store.upsert_agent(&record)?, record))
    })
    .await?;
    if old != Some(AgentState::Online) {
        announce(shared, &node, old, AgentState::Online, now).await?;
    }
    // A fresh credential on every (re)connect: the one it came with may be a long-lived
    // enrolment token or close to expiry.
    if let Err(e) = renew_credential(shared, &node).await {
        shared.metrics.bus_errors.inc();
        tracing::warn!(%node, error = %e, "Credential renewal failed.");
    }
    // The register is the agent's report of its config documents: push what it lacks.
    if let Err(e) = crate::configs::converge(shared, record, reported).await {
        shared.metrics.bus_errors.inc();
        tracing::warn!(%node, error = %e, "Config convergence failed.");
    }
    // The register says which version runs: an upgrade to it is done; pending ones go out.
    if let Err(e) = crate::upgrades::at_register(shared, &node, version).await {
        shared.metrics.bus_errors.inc();
        tracing::warn!(%node, error = %e, "Upgrade bookkeeping at register failed.");
    }
    dispatch_pending(shared, &node).await
}

/// Stores a refusal an agent reported and acknowledges it.
async fn refused(shared: &Shared, node: UserId, refused: fleet::Refused) -> Result<(), BusError> {
    shared.metrics.commands_refused.inc();
    tracing::warn!(
        %node,
        route = %refused.route,
        reason = %refused.reason,
        detail = %refused.detail,
        command_id = refused.command_id.as_deref().unwrap_or(""),
        task_id = refused.task_id.unwrap_or(0),
        "An agent refused a command."
    );
    // A refusal that only a genuine command can cause (the signature verified, it named
    // this node and route, but it expired or would not decode) fails that attempt now
    // instead of leaving it to time out; forged commands change no task.
    let genuine = matches!(refused.reason.as_str(), "expired" | "lifetime" | "body");
    if let (true, Some(task_id), Some(attempt)) = (genuine, refused.task_id, refused.attempt) {
        let result = fleet::TaskResult {
            message_id: refused.message_id.clone(),
            task_id,
            attempt,
            outcome: fleet::Outcome::Failed,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            error: Some(format!("refused by the agent: {}", refused.detail)),
            latency_ms: None,
            http_status: None,
            finished_at_ms: refused.at_ms,
            output_chunks: 0,
        };
        store_results(
            shared,
            vec![Incoming {
                node: node.clone(),
                result,
                _hop: None,
            }],
        )
        .await;
    }
    let n = node.clone();
    let message_id = refused.message_id.clone();
    blocking(shared, move |store| {
        store.record_refusal(&n, &refused, now_ms())
    })
    .await?;
    push(
        shared,
        &node,
        fleet::down::ACK,
        &fleet::Ack {
            message_ids: vec![message_id],
        },
        None,
    )
    .await
}

async fn status(shared: &Shared, node: UserId, s: fleet::Status) -> Result<(), BusError> {
    let now = now_ms();
    let degraded = s.state == WireState::Degraded;
    let n = node.clone();
    let old = blocking(shared, move |store| store.touch(&n, now, degraded)).await?;
    if let Some(old) = old {
        let new = if degraded {
            AgentState::Degraded
        } else {
            AgentState::Online
        };
        announce(shared, &node, Some(old), new, now).await?;
    }
    Ok(())
}

async fn reports(shared: &Shared, node: UserId, batch: fleet::ReportBatch) -> Result<(), BusError> {
    let now = now_ms();
    let n = node.clone();
    let acked = blocking(shared, move |store| {
        let mut acked = Vec::with_capacity(batch.reports.len());
        for r in batch.reports {
            let metrics: serde_json::Map<String, serde_json::Value> = r
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::json!(v)))
                .collect();
            let mut value = serde_json::Value::Object(metrics);
            if let serde_json::Value::Object(m) = &mut value {
                m.insert("at_ms".into(), serde_json::json!(r.at_ms));
            }
            match store.record_report(&r.message_id, &n, &value, now) {
                Ok(_) => acked.push(r.message_id),
                // An id the store can never accept would otherwise be replayed forever.
                Err(StoreError::InvalidMessageId) => acked.push(r.message_id),
                Err(e) => return Err(e),
            }
        }
        Ok(acked)
    })
    .await?;
    shared.metrics.reports.inc_by(acked.len() as u64);
    if acked.is_empty() {
        return Ok(());
    }
    push(
        shared,
        &node,
        fleet::down::ACK,
        &fleet::Ack { message_ids: acked },
        None,
    )
    .await
}

/// A decoded task result waiting to be stored with the rest of its burst.
struct Incoming {
    node: UserId,
    result: fleet::TaskResult,
    _hop: Option<MessageSpan>,
}

fn result_body(r: &fleet::TaskResult) -> ResultBody {
    let mut error = r.error.clone();
    // The store decides success from error and exit code; make a non-success outcome with
    // neither (a failed probe with only a status, a timeout) count as a failure.
    if r.outcome != fleet::Outcome::Succeeded && error.is_none() {
        error = Some(
            match r.outcome {
                fleet::Outcome::TimedOut => "timed out",
                fleet::Outcome::Cancelled => "cancelled",
                _ => "failed",
            }
            .to_owned(),
        );
    }
    ResultBody {
        exit_code: r.exit_code,
        stdout_tail: r.stdout_tail.clone(),
        stderr_tail: r.stderr_tail.clone(),
        error,
        latency_ms: r.latency_ms,
        finished_at_ms: r.finished_at_ms,
        output_chunks: r.output_chunks,
    }
}

/// Stores a burst of results in one transaction, then acknowledges them (one ack per agent)
/// so the agents can clear their outboxes. Nothing is acknowledged if the store fails: the
/// agents replay and ingestion is idempotent.
async fn store_results(shared: &Shared, batch: Vec<Incoming>) {
    if batch.is_empty() {
        return;
    }
    let rows: Vec<(String, u64, UserId, ResultBody)> = batch
        .iter()
        .map(|i| {
            (
                i.result.message_id.clone(),
                i.result.task_id,
                i.node.clone(),
                result_body(&i.result),
            )
        })
        .collect();
    let outcomes = blocking(shared, move |store| {
        let batch: Vec<NewResult<'_>> = rows
            .iter()
            .map(|(message_id, task_id, node_id, body)| NewResult {
                message_id,
                task_id: *task_id,
                node_id,
                body,
            })
            .collect();
        store.record_results(&batch)
    })
    .await;
    let outcomes = match outcomes {
        Ok(outcomes) => outcomes,
        Err(e) => {
            shared.metrics.bus_errors.inc();
            tracing::warn!(results = batch.len(), error = %e, "Storing results failed; the agents will replay them.");
            return;
        }
    };
    let mut acks: BTreeMap<UserId, Vec<String>> = BTreeMap::new();
    for (incoming, outcome) in batch.into_iter().zip(outcomes) {
        let (node, task_id) = (&incoming.node, incoming.result.task_id);
        match outcome {
            Ok(Ingest::New) => {
                shared.metrics.results.inc();
            }
            Ok(Ingest::Duplicate) => {
                shared.metrics.duplicate_results.inc();
            }
            // These can never succeed on a replay; acknowledging clears the agent's outbox.
            Err(
                e @ (StoreError::UnknownTask(_)
                | StoreError::NotATarget { .. }
                | StoreError::InvalidMessageId),
            ) => {
                tracing::warn!(%node, task_id, error = %e, "Dropped an unusable result.");
            }
            Err(e) => {
                shared.metrics.bus_errors.inc();
                tracing::warn!(%node, task_id, error = %e, "A result was refused.");
                continue;
            }
        }
        acks.entry(incoming.node)
            .or_default()
            .push(incoming.result.message_id);
    }
    for (node, message_ids) in acks {
        let ack = fleet::Ack { message_ids };
        if let Err(e) = push(shared, &node, fleet::down::ACK, &ack, None).await {
            shared.metrics.bus_errors.inc();
            tracing::warn!(%node, error = %e, "Acknowledging results failed.");
        }
    }
}

/// Publishes a state change on `fleet.agent.state.<node>`.
async fn announce(
    shared: &Shared,
    node: &UserId,
    from: Option<AgentState>,
    to: AgentState,
    at_ms: u64,
) -> Result<(), BusError> {
    shared.metrics.state_changes.inc();
    tracing::info!(%node, ?from, ?to, "Agent state changed.");
    let change = fleet::StateChange {
        node_id: node.as_str().to_owned(),
        from: from.map(wire_state),
        to: wire_state(to),
        at_ms,
    };
    let body = payload::to_bus(&change)?;
    shared
        .client
        .publish(fleet::state_subject(node), Bytes::from(body))
        .await
        .map_err(|e| BusError::Publish(e.to_string()))
}

/// Pushes a typed message to `node`'s agent sockets on its own channel (`ws.agent.<node>`),
/// signed with the command key: the MessagePack body goes inside a signed envelope that
/// names the node, the route and an expiry ([`messages::command`]), so the agent can check
/// that the control plane sent it whatever carried it.
pub(crate) async fn push<T: Serialize>(
    shared: &Shared,
    node: &UserId,
    route: &'static str,
    body: &T,
    trace: Option<&TraceContext>,
) -> Result<(), BusError> {
    let bytes = payload::to_bus(body)?;
    let lifetime = u64::try_from(shared.config.command_ttl.as_millis()).unwrap_or(u64::MAX);
    let (bytes, _command_id) =
        shared
            .config
            .command_key
            .sign(node.as_str(), route, bytes, now_ms(), lifetime)?;
    // Any non-zero id: agents deduplicate by the envelope's command id, not by this.
    let id = (rand::random::<u64>() >> 1).max(1);
    let mut envelope = PushEnvelope::new(id, Route::new(route)?, BodyCodec::MsgPack);
    let subject = subject::agent(node);
    // Only messages that belong to a trace (a task from a traced request) get a span; acks
    // and other control traffic would each start a trace of their own.
    let hop = trace.map(|t| MessageSpan::start(Operation::Publish, &subject, id, Some(t)));
    envelope.trace = hop.as_ref().and_then(MessageSpan::context);
    let mut map = envelope.to_headers();
    headers::stamp_hop(&mut map, headers::hop::SERVICE_PUB, headers::now_micros());
    shared
        .client
        .publish_with_headers(subject, map, Bytes::from(bytes))
        .await
        .map_err(|e| BusError::Publish(e.to_string()))?;
    shared.metrics.pushes.inc();
    Ok(())
}

/// Publishes a tunnel frame to `node` without a signature: data, windows and closes are
/// bound to their stream by the token of its signed open (ADR 0014), and signing every
/// chunk would cost a signature and the agent a verification per 32 KiB.
pub(crate) async fn push_unsigned<T: Serialize>(
    shared: &Shared,
    node: &UserId,
    route: &'static str,
    body: &T,
) -> Result<(), BusError> {
    let bytes = payload::to_bus(body)?;
    let id = (rand::random::<u64>() >> 1).max(1);
    let envelope = PushEnvelope::new(id, Route::new(route)?, BodyCodec::MsgPack);
    let mut map = envelope.to_headers();
    headers::stamp_hop(&mut map, headers::hop::SERVICE_PUB, headers::now_micros());
    shared
        .client
        .publish_with_headers(subject::agent(node), map, Bytes::from(bytes))
        .await
        .map_err(|e| BusError::Publish(e.to_string()))
}

/// Closes `node`'s agent sockets on every gateway with `code` (a revoked node).
pub(crate) async fn close_agent(
    shared: &Shared,
    node: &UserId,
    code: CloseCode,
) -> Result<(), BusError> {
    shared
        .client
        .publish_with_headers(
            subject::agent(node),
            AgentClose { code }.to_headers(),
            Bytes::new(),
        )
        .await
        .map_err(|e| BusError::Publish(e.to_string()))
}

/// Issues `node` a fresh agent token and pushes it (signed) over its live connection, if
/// the scheduler holds the agent-token key.
pub(crate) async fn renew_credential(shared: &Shared, node: &UserId) -> Result<(), BusError> {
    let Some(tokens) = shared.config.agent_tokens.as_ref() else {
        return Ok(());
    };
    let now_s = now_ms() / 1000;
    let (token, expires_at) = tokens
        .mint(node, now_s, tokens.ttl)
        .map_err(|e| BusError::BadMessage(format!("cannot mint an agent token: {e}")))?;
    push(
        shared,
        node,
        fleet::down::CREDENTIAL,
        &fleet::Credential { token, expires_at },
        None,
    )
    .await?;
    shared.trust.issued(node, now_s);
    shared.metrics.credentials_issued.inc();
    tracing::debug!(%node, expires_at, "Agent credential renewed.");
    Ok(())
}

/// Renews the credentials of connected agents whose token is past half its life.
async fn renew_due(shared: &Shared) {
    let Some(tokens) = shared.config.agent_tokens.as_ref() else {
        return;
    };
    let half = tokens.ttl.as_secs() / 2;
    let before = (now_ms() / 1000).saturating_sub(half.max(1));
    for node in shared.trust.due(before) {
        if let Err(e) = renew_credential(shared, &node).await {
            shared.metrics.bus_errors.inc();
            tracing::warn!(%node, error = %e, "Credential renewal failed.");
        }
    }
}

/// Marks one target dispatched and pushes the task to the agent.
///
/// The store is updated first: if the push is lost the attempt expires and is retried,
/// whereas pushing first could let the result arrive before the target left Pending.
pub(crate) async fn dispatch(
    shared: &Shared,
    node: &UserId,
    task_id: TaskId,
    spec: &TaskSpec,
) -> Result<(), BusError> {
    let (sent, mut skipped) = dispatch_many(shared, task_id, spec, vec![node.clone()]).await?;
    match skipped.pop() {
        Some((_, e)) if sent == 0 => Err(BusError::Store(e)),
        _ => Ok(()),
    }
}

/// Marks many targets of one task dispatched in one transaction (one fsync for a fan-out
/// to thousands of agents), then pushes the task to each. Returns how many were sent and
/// the targets the store refused (cancelled or dispatched meanwhile, not a target) with
/// the reason; those get nothing. A failed push leaves its target Dispatched: the attempt
/// expires and is retried like any lost message.
pub(crate) async fn dispatch_many(
    shared: &Shared,
    task_id: TaskId,
    spec: &TaskSpec,
    nodes: Vec<UserId>,
) -> Result<(u64, Vec<(UserId, StoreError)>), BusError> {
    let (nodes, attempts) = blocking(shared, move |store| {
        let attempts = store.mark_dispatched_many(task_id, &nodes, now_ms())?;
        Ok((nodes, attempts))
    })
    .await?;
    let (kind, timeout_ms) = wire_kind(&spec.kind);
    let trace = spec
        .traceparent
        .as_deref()
        .and_then(TraceContext::parse_traceparent);
    let mut sent = 0;
    let mut skipped = Vec::new();
    for (node, attempt) in nodes.into_iter().zip(attempts) {
        let attempt = match attempt {
            Ok(attempt) => attempt,
            Err(e) => {
                skipped.push((node, e));
                continue;
            }
        };
        let task = fleet::Task {
            task_id,
            attempt,
            spec: kind.clone(),
            timeout_ms,
        };
        match push(shared, &node, fleet::down::TASK, &task, trace.as_ref()).await {
            Ok(()) => {
                sent += 1;
                shared.metrics.dispatches.inc();
            }
            Err(e) => tracing::warn!(%node, task_id, error = %e, "Dispatch failed."),
        }
    }
    Ok((sent, skipped))
}

/// Sends `node` every task waiting for it, oldest first.
pub(crate) async fn dispatch_pending(shared: &Shared, node: &UserId) -> Result<(), BusError> {
    let n = node.clone();
    let pending = blocking(shared, move |store| store.pending_for(&n)).await?;
    for (task_id, spec) in pending {
        match dispatch(shared, node, task_id, &spec).await {
            // Cancelled or dispatched meanwhile (an API call raced us): nothing to send.
            Err(BusError::Store(StoreError::InvalidTransition { .. })) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Whether an agent can take work now.
pub(crate) fn is_up(state: AgentState) -> bool {
    state.is_up()
}

/// Pushes `body` on `route` to each of `nodes` that is up (the others get what they lack
/// when they register); counts each push that went out in `sent_metric` and returns how
/// many did. A failed push is logged, not fatal, for the same reason.
pub(crate) async fn push_to_up<T: Serialize>(
    shared: &Shared,
    nodes: Vec<UserId>,
    route: &'static str,
    body: &T,
    sent_metric: &prometheus_client::metrics::counter::Counter,
) -> Result<u64, BusError> {
    let up = blocking(shared, move |store| store.up_of(&nodes)).await?;
    let mut sent = 0;
    for node in up {
        match push(shared, &node, route, body, None).await {
            Ok(()) => {
                sent += 1;
                sent_metric.inc();
            }
            Err(e) => tracing::warn!(%node, route, error = %e, "Push failed."),
        }
    }
    Ok(sent)
}

/// Every sweep period: agents silent for the configured number of heartbeat periods go
/// offline; in-flight attempts past their deadline are retried or time out.
async fn sweep(shared: std::sync::Weak<Shared>) {
    loop {
        let period = match shared.upgrade() {
            Some(s) => s.config.sweep,
            None => break,
        };
        tokio::time::sleep(period).await;
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if let Err(e) = sweep_once(&shared).await {
            shared.metrics.bus_errors.inc();
            tracing::warn!(error = %e, "Sweep failed.");
        }
    }
}

/// One liveness and deadline pass (public so tests and tools can force one).
pub(crate) async fn sweep_once(shared: &Shared) -> Result<(), BusError> {
    renew_due(shared).await;
    let now = now_ms();
    let offline_after =
        u64::try_from(shared.config.offline_after().as_millis()).unwrap_or(u64::MAX);
    let cutoff = now.saturating_sub(offline_after);
    let (gone, expired) = blocking(shared, move |store| {
        let gone = store.mark_offline_before(cutoff)?;
        let expired = store.expire_dispatched_before(now)?;
        // Retries go out at once to agents that are up; the others wait for a register.
        let mut retry: BTreeMap<UserId, Vec<(TaskId, TaskSpec)>> = BTreeMap::new();
        for e in &expired {
            if e.new_state != TargetState::Pending {
                continue;
            }
            let up = store.agent(&e.node_id)?.is_some_and(|a| is_up(a.state));
            if let (true, Some(task)) = (up, store.task(e.task_id)?) {
                retry
                    .entry(e.node_id.clone())
                    .or_default()
                    .push((e.task_id, task.spec));
            }
        }
        Ok((gone, (expired.len(), retry)))
    })
    .await?;
    for (node, old) in gone {
        announce(shared, &node, Some(old), AgentState::Offline, now).await?;
    }
    let (expired_count, retry) = expired;
    if expired_count > 0 {
        tracing::info!(expired = expired_count, "Expired overdue task attempts.");
    }
    for (node, tasks) in retry {
        for (task_id, spec) in tasks {
            match dispatch(shared, &node, task_id, &spec).await {
                Err(BusError::Store(StoreError::InvalidTransition { .. })) => {}
                other => other?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_kinds_convert_both_ways() {
        let kinds = [
            fleet::TaskKind::Command {
                argv: vec!["uptime".into()],
                env: BTreeMap::from([("A".into(), "1".into())]),
                cwd: Some("/tmp".into()),
            },
            fleet::TaskKind::TcpProbe {
                target: "127.0.0.1:1".into(),
            },
            fleet::TaskKind::HttpProbe {
                url: "http://x/".into(),
            },
        ];
        for k in kinds {
            assert_eq!(wire_kind(&store_kind(&k, 42)), (k, 42));
        }
    }
}
