//! The fleet contract: what edge agents and the scheduler say to each other through the
//! gateways.
//!
//! Agents are clients whose token has `kind: agent`, signed with the agent-token key (not
//! the app key), and whose user id is the node id. Upstream they send publish frames on the
//! routes below; the gateway puts them on `ws.msg.agent.<route>` (queue group `scheduler`).
//! Downstream the scheduler pushes on the node's own channel (`ws.agent.<node>`), with the
//! route naming the message; every downstream body is a signed envelope
//! ([`crate::command`]) around the typed message. Every body is MessagePack with named
//! fields ([`crate::payload::to_bus`] / [`crate::payload::from_bus`]); agent liveness itself
//! comes from the gateways' presence batches on `ws.evt.agent.*`.
//!
//! Delivery: reports and results carry a `message_id` that the agent keeps in its durable
//! outbox until an [`Ack`] names it; the scheduler ingests by message id, so a replay is
//! acknowledged again and never counted twice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Routes of agent -> scheduler publish frames.
pub mod up {
    /// [`super::Register`]: sent after every (re)connect.
    pub const REGISTER: &str = "agent.register";
    /// [`super::Status`]: online/degraded changes.
    pub const STATUS: &str = "agent.status";
    /// [`super::ReportBatch`]: pre-aggregated metrics (outboxed).
    pub const REPORT: &str = "agent.report";
    /// [`super::TaskStarted`]: a task began executing.
    pub const STARTED: &str = "agent.task.started";
    /// [`super::TaskOutput`]: a chunk of a command's output (best effort, not outboxed).
    pub const OUTPUT: &str = "agent.task.output";
    /// [`super::TaskResult`]: a task finished (outboxed).
    pub const RESULT: &str = "agent.task.result";
    /// [`super::Refused`]: the agent refused a command (bad signature, expired, replayed,
    /// another node's); outboxed.
    pub const REFUSED: &str = "agent.refused";
    /// [`super::ConfigAck`]: the agent applied a config document, or failed to (outboxed).
    pub const CONFIG_ACK: &str = "agent.config.ack";
    /// [`super::UpgradeResult`]: progress and outcome of an upgrade (outboxed).
    pub const UPGRADE_RESULT: &str = "agent.upgrade.result";
}

/// Routes of scheduler -> agent pushes.
pub mod down {
    /// [`super::Ack`]: outbox entries the scheduler has durably ingested.
    pub const ACK: &str = "agent.ack";
    /// [`super::Task`]: run this.
    pub const TASK: &str = "agent.task";
    /// [`super::Cancel`]: stop this.
    pub const CANCEL: &str = "agent.cancel";
    /// [`super::Credential`]: a renewed token for this node.
    pub const CREDENTIAL: &str = "agent.credential";
    /// [`super::ConfigPush`]: write this version of a config document.
    pub const CONFIG: &str = "agent.config";
    /// [`super::UpgradeManifest`]: download, verify and install this agent binary.
    pub const UPGRADE: &str = "agent.upgrade";

    /// Every downstream route, all of them signed.
    pub const ALL: [&str; 6] = [ACK, TASK, CANCEL, CREDENTIAL, CONFIG, UPGRADE];
}

/// Subject on which the scheduler announces agent state changes ([`StateChange`]).
pub fn state_subject(node: &crate::UserId) -> String {
    format!("fleet.agent.state.{node}")
}

/// Wildcard for every agent's state changes.
pub const STATE_WILDCARD: &str = "fleet.agent.state.*";

/// Liveness of an agent as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Connected and healthy.
    Online,
    /// Connected, but reporting a problem (disk nearly full, tasks failing).
    Degraded,
    /// Not heard from for three heartbeat periods, or disconnected.
    Offline,
}

/// First message after a connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Must equal the token's subject; the scheduler trusts the gateway's `ws-user` header.
    pub node_id: String,
    /// Host name.
    pub hostname: String,
    /// Agent version.
    pub version: String,
    /// Labels for selectors (`region=eu`, `role=edge`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Addresses the node has.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The config documents the agent has applied, by name, as it finds them on disk now
    /// (absent from older agents: none). The scheduler pushes every desired version that
    /// differs, so an agent that was offline or whose files drifted converges.
    #[serde(default)]
    pub configs: BTreeMap<String, AppliedConfig>,
}

/// A config document as an agent has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedConfig {
    /// The version it last applied.
    pub version: u64,
    /// SHA-256 (64 lowercase hex digits) of the file as it is on disk now; differs from the
    /// applied version's when the file was changed locally (or is gone: empty).
    pub sha256: String,
}

/// Largest config document, bytes: a push must stay far below NATS's 1 MiB payload and
/// the agent's frame limit once signed and wrapped.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// Longest config document name.
pub const MAX_CONFIG_NAME_LEN: usize = 128;

/// Why a config document name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigNameError {
    /// Empty or longer than [`MAX_CONFIG_NAME_LEN`].
    #[error("config name must be 1 to {MAX_CONFIG_NAME_LEN} characters")]
    Length,
    /// A character outside `[A-Za-z0-9._-]` (a slash, a NUL, white space...).
    #[error("config name {0:?} may only hold A-Z a-z 0-9 . _ - (no path separators)")]
    Character(String),
    /// Starts with a dot (`.`, `..`, hidden and temp files).
    #[error("config name {0:?} must not start with a dot")]
    Dot(String),
}

/// Checks that `name` is a safe file name in the agent's config directory: 1 to 128
/// characters from `[A-Za-z0-9._-]`, not starting with a dot. No separator, no `..`, no
/// hidden file: a name can only ever be a plain file directly inside that directory.
pub fn check_config_name(name: &str) -> Result<(), ConfigNameError> {
    if name.is_empty() || name.len() > MAX_CONFIG_NAME_LEN {
        return Err(ConfigNameError::Length);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ConfigNameError::Character(name.to_owned()));
    }
    if name.starts_with('.') {
        return Err(ConfigNameError::Dot(name.to_owned()));
    }
    Ok(())
}

/// SHA-256 of a config document as 64 lowercase hex digits (what pushes, acks and
/// registers carry).
pub fn config_sha256(content: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(content)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One version of a config document for one agent (signed like every push).
///
/// The agent writes `content` to `<config_dir>/<name>` atomically: a temp file in that
/// directory, fsync, `validate` (if any) against the temp file, rename over the old file,
/// fsync of the directory, then `reload` (if any). It acks with [`ConfigAck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPush {
    /// File name ([`check_config_name`]).
    pub name: String,
    /// Version number (from 1 per name).
    pub version: u64,
    /// [`config_sha256`] of `content`; the agent refuses to apply content that differs.
    pub sha256: String,
    /// The document.
    #[serde(with = "serde_bytes")]
    pub content: Vec<u8>,
    /// Run before the file is replaced; an argument `{file}` is replaced by the path of
    /// the new content. Must be on the agent's command allowlist. Non-zero: not applied.
    #[serde(default)]
    pub validate: Option<Vec<String>>,
    /// Run after the file was replaced (same rules, `{file}` is the final path).
    #[serde(default)]
    pub reload: Option<Vec<String>>,
}

/// How applying a config version ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigOutcome {
    /// The file holds this version (and validate and reload succeeded).
    Applied,
    /// Not applied (checksum, validate, write error), or applied but reload failed: see
    /// the error.
    Failed,
}

/// The agent's answer to a [`ConfigPush`] (outboxed, acknowledged with [`Ack`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigAck {
    /// Outbox message id (idempotent ingestion).
    pub message_id: String,
    /// Document name.
    pub name: String,
    /// The version the push carried.
    pub version: u64,
    /// The push's SHA-256.
    pub sha256: String,
    /// Applied or failed.
    pub status: ConfigOutcome,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Unix ms.
    pub at_ms: u64,
}

/// Largest agent artifact, bytes: bounds what an upload stores and what an agent downloads.
pub const MAX_ARTIFACT_BYTES: u64 = 256 * 1024 * 1024;

/// Shortest and longest time an upgraded agent gets to come back online, ms.
pub const UPGRADE_DEADLINE_MS: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;

/// The HTTP path an agent downloads artifact `sha256` from, relative to the scheduler's
/// base URL (authenticated with the agent's own token).
pub fn artifact_path(sha256: &str) -> String {
    format!("/v1/artifacts/{sha256}")
}

/// Whether `s` is a SHA-256 as the fleet writes it: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a manifest is refused before anything is downloaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// `sha256` is not 64 lowercase hex digits.
    #[error("sha256 must be 64 lowercase hex digits")]
    Sha256,
    /// Size zero or above [`MAX_ARTIFACT_BYTES`].
    #[error("size must be 1 to {MAX_ARTIFACT_BYTES} bytes, not {0}")]
    Size(u64),
    /// `path` is not [`artifact_path`] of `sha256`: a signed manifest still may only send
    /// the agent's credential to the artifact it names.
    #[error("path {0:?} is not the artifact's download path")]
    Path(String),
    /// Deadline outside [`UPGRADE_DEADLINE_MS`].
    #[error("deadline must be 1 s to 1 h, not {0} ms")]
    Deadline(u64),
    /// Version empty, longer than 64 bytes or with characters outside `[A-Za-z0-9._+-]`.
    #[error("version {0:?} must be 1 to 64 of A-Z a-z 0-9 . _ + -")]
    Version(String),
    /// Built for another platform.
    #[error("the artifact is for {0}; this agent runs on {1}")]
    Platform(String, String),
}

/// Checks a version string: 1 to 64 of `[A-Za-z0-9._+-]`.
pub fn check_version(version: &str) -> Result<(), ManifestError> {
    if version.is_empty()
        || version.len() > 64
        || !version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
    {
        return Err(ManifestError::Version(version.to_owned()));
    }
    Ok(())
}

/// An upgrade for one agent (signed like every push, so every field is the control plane's
/// word): download the artifact, check its size and SHA-256, install it in place of the
/// running binary and restart into it; if it is not back online within `deadline_ms`,
/// restore the previous binary. The agent reports with [`UpgradeResult`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeManifest {
    /// The upgrade (the scheduler's id; results name it).
    pub upgrade_id: u64,
    /// The version the new binary reports once running ([`check_version`]).
    pub version: String,
    /// SHA-256 of the artifact, 64 lowercase hex digits.
    pub sha256: String,
    /// Its size, bytes.
    pub size: u64,
    /// Where to download it, relative to the scheduler's base URL: always
    /// [`artifact_path`] of `sha256`.
    pub path: String,
    /// How long the new binary gets to register after the restart, ms.
    pub deadline_ms: u64,
    /// Operating system it is built for (`linux`), as Rust's `std::env::consts::OS`; none:
    /// any.
    #[serde(default)]
    pub os: Option<String>,
    /// CPU architecture (`x86_64`, `aarch64`), as `std::env::consts::ARCH`; none: any.
    #[serde(default)]
    pub arch: Option<String>,
}

impl UpgradeManifest {
    /// Checks everything that can be checked before a download, for an agent running on
    /// `os`/`arch`.
    pub fn check(&self, os: &str, arch: &str) -> Result<(), ManifestError> {
        if !is_sha256_hex(&self.sha256) {
            return Err(ManifestError::Sha256);
        }
        if self.size == 0 || self.size > MAX_ARTIFACT_BYTES {
            return Err(ManifestError::Size(self.size));
        }
        if self.path != artifact_path(&self.sha256) {
            return Err(ManifestError::Path(self.path.clone()));
        }
        if !UPGRADE_DEADLINE_MS.contains(&self.deadline_ms) {
            return Err(ManifestError::Deadline(self.deadline_ms));
        }
        check_version(&self.version)?;
        let want = (
            self.os.as_deref().unwrap_or(os),
            self.arch.as_deref().unwrap_or(arch),
        );
        if want != (os, arch) {
            return Err(ManifestError::Platform(
                format!("{}/{}", want.0, want.1),
                format!("{os}/{arch}"),
            ));
        }
        Ok(())
    }
}

/// Where an agent stands with an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeOutcome {
    /// The download began.
    Downloading,
    /// Verified and installed; the agent is restarting into it.
    Installed,
    /// The new binary registered and runs.
    Completed,
    /// The new binary did not come back online in time (or exited): the previous binary
    /// was restored and runs again; see the error.
    RolledBack,
    /// Nothing was installed (download, size, SHA-256, platform, disk): the old binary
    /// keeps running; see the error.
    Failed,
}

/// An agent's report on an upgrade (outboxed, acknowledged with [`Ack`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeResult {
    /// Outbox message id (idempotent ingestion).
    pub message_id: String,
    /// The manifest's upgrade id.
    pub upgrade_id: u64,
    /// The manifest's version.
    pub version: String,
    /// The manifest's SHA-256.
    pub sha256: String,
    /// Where it stands.
    pub status: UpgradeOutcome,
    /// Why it failed or was rolled back.
    #[serde(default)]
    pub error: Option<String>,
    /// The version of the binary that sent this report.
    pub running_version: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// A health change reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Online or degraded (an agent never reports itself offline).
    pub state: AgentState,
    /// Why, when degraded.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One pre-aggregated status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Outbox message id.
    pub message_id: String,
    /// Unix ms at the end of the aggregation window.
    pub at_ms: u64,
    /// Metric name -> value averaged over the window (`cpu_pct`, `mem_pct`, `disk_pct`, `load1`).
    pub metrics: BTreeMap<String, f64>,
}

/// Several reports in one frame (sent compressed when large).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportBatch {
    /// Reports, oldest first.
    pub reports: Vec<Report>,
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    /// Run a program (must be on the agent's allowlist).
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Working directory.
        #[serde(default)]
        cwd: Option<String>,
    },
    /// Open a TCP connection to `target` (`host:port`).
    TcpProbe {
        /// Target.
        target: String,
    },
    /// GET `url` (http only).
    HttpProbe {
        /// Target URL.
        url: String,
    },
}

/// A task for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    pub task_id: u64,
    /// Attempt number (1-based); results name it.
    pub attempt: u32,
    /// What to do.
    pub spec: TaskKind,
    /// Kill/abandon after this long.
    pub timeout_ms: u64,
}

/// Stop a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// Task id.
    pub task_id: u64,
}

/// A task began executing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStarted {
    /// Task id.
    pub task_id: u64,
    /// Attempt.
    pub attempt: u32,
    /// Unix ms.
    pub at_ms: u64,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A chunk of output, streamed while a command runs (best effort: not outboxed).
///
/// `seq` counts the chunks of one attempt across both streams, from 0, including chunks
/// the agent cut but did not send (its queue was full or the link too slow): a jump in
/// `seq` is a gap the receiver can report, and `offset` says where in its stream a chunk
/// starts, so the size of a gap is known too. The durable result's tails never depend on
/// these chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// Task id.
    pub task_id: u64,
    /// The attempt that produced it (0 from agents that predate the field).
    #[serde(default)]
    pub attempt: u32,
    /// Chunk number within the attempt, from 0, shared by both streams.
    pub seq: u64,
    /// Stream.
    pub stream: Stream,
    /// Bytes of this stream produced before this chunk.
    #[serde(default)]
    pub offset: u64,
    /// The bytes, as UTF-8 (a character split by a cut is carried to the next chunk;
    /// invalid bytes become U+FFFD).
    pub data: String,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit code 0 / probe reached its target.
    Succeeded,
    /// Non-zero exit, probe failed, or refused (not allowlisted).
    Failed,
    /// Killed after its timeout.
    TimedOut,
    /// Stopped by a cancel.
    Cancelled,
}

/// A finished task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Outbox message id (idempotent ingestion).
    pub message_id: String,
    /// Task id.
    pub task_id: u64,
    /// Attempt.
    pub attempt: u32,
    /// Outcome.
    pub outcome: Outcome,
    /// Exit code of a command.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Last few KiB of stdout.
    #[serde(default)]
    pub stdout_tail: String,
    /// Last few KiB of stderr.
    #[serde(default)]
    pub stderr_tail: String,
    /// Error text (refused, probe error).
    #[serde(default)]
    pub error: Option<String>,
    /// Probe latency or command duration, ms.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// HTTP status of an HTTP probe.
    #[serde(default)]
    pub http_status: Option<u16>,
    /// Unix ms.
    pub finished_at_ms: u64,
    /// Live output chunks the attempt cut ([`TaskOutput::seq`] ran from 0 to this, less
    /// one), sent or not: a receiver that saw fewer knows the end of the stream is missing
    /// (absent from older agents: 0).
    #[serde(default)]
    pub output_chunks: u64,
}

/// Outbox entries the scheduler has ingested; the agent deletes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Message ids.
    pub message_ids: Vec<String>,
}

/// A renewed agent credential (pushed before the current one expires).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The token (a JWT signed with the agent-token key).
    pub token: String,
    /// Unix seconds when it expires.
    pub expires_at: u64,
}

/// A command the agent refused to act on, reported so operators see forgeries, clock
/// skew and key mix-ups. What it says about the command is its unverified claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Outbox message id (idempotent ingestion).
    pub message_id: String,
    /// Route it arrived on.
    pub route: String,
    /// Why ([`crate::command::Refusal::as_str`]).
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    /// The command id it claimed, if readable.
    #[serde(default)]
    pub command_id: Option<String>,
    /// The task id it claimed, if it was a readable task or cancel.
    #[serde(default)]
    pub task_id: Option<u64>,
    /// The attempt it claimed, if it was a readable task.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Unix ms.
    pub at_ms: u64,
}

/// An agent's state changed (`fleet.agent.state.<node>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// Node.
    pub node_id: String,
    /// Previous state (none for a first registration).
    pub from: Option<AgentState>,
    /// New state.
    pub to: AgentState,
    /// Unix ms.
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{from_bus, to_bus};

    #[test]
    fn output_chunks_from_agents_without_attempt_and_offset_still_decode() {
        #[derive(Serialize)]
        struct Old<'a> {
            task_id: u64,
            seq: u64,
            stream: Stream,
            data: &'a str,
        }
        let old = to_bus(&Old {
            task_id: 9,
            seq: 2,
            stream: Stream::Stderr,
            data: "x",
        })
        .unwrap();
        let chunk: TaskOutput = from_bus(&old).unwrap();
        assert_eq!((chunk.attempt, chunk.offset, chunk.seq), (0, 0, 2));
        let new = TaskOutput {
            task_id: 9,
            attempt: 3,
            seq: 4,
            stream: Stream::Stdout,
            offset: 17,
            data: "é".into(),
        };
        assert_eq!(from_bus::<TaskOutput>(&to_bus(&new).unwrap()).unwrap(), new);
    }

    #[test]
    fn every_message_round_trips_as_named_msgpack() {
        let task = Task {
            task_id: 7,
            attempt: 1,
            spec: TaskKind::Command {
                argv: vec!["uptime".into()],
                env: BTreeMap::new(),
                cwd: None,
            },
            timeout_ms: 5_000,
        };
        assert_eq!(from_bus::<Task>(&to_bus(&task).unwrap()).unwrap(), task);
        for spec in [
            TaskKind::TcpProbe {
                target: "127.0.0.1:80".into(),
            },
            TaskKind::HttpProbe {
                url: "http://x/".into(),
            },
        ] {
            assert_eq!(from_bus::<TaskKind>(&to_bus(&spec).unwrap()).unwrap(), spec);
        }
        let result = TaskResult {
            message_id: "abc-1".into(),
            task_id: 7,
            attempt: 1,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            stdout_tail: "ok".into(),
            stderr_tail: String::new(),
            error: None,
            latency_ms: Some(3),
            http_status: None,
            finished_at_ms: 9,
            output_chunks: 0,
        };
        assert_eq!(
            from_bus::<TaskResult>(&to_bus(&result).unwrap()).unwrap(),
            result
        );
        let reg = Register {
            node_id: "n1".into(),
            hostname: "h".into(),
            version: "0.1.0".into(),
            labels: BTreeMap::from([("region".into(), "eu".into())]),
            addresses: vec!["10.0.0.1".into()],
            configs: BTreeMap::from([(
                "app.conf".into(),
                AppliedConfig {
                    version: 3,
                    sha256: config_sha256(b"x"),
                },
            )]),
        };
        assert_eq!(from_bus::<Register>(&to_bus(&reg).unwrap()).unwrap(), reg);
        let ack = Ack {
            message_ids: vec!["a".into(), "b".into()],
        };
        assert_eq!(from_bus::<Ack>(&to_bus(&ack).unwrap()).unwrap(), ack);
        let batch = ReportBatch {
            reports: vec![Report {
                message_id: "r1".into(),
                at_ms: 1,
                metrics: BTreeMap::from([("cpu_pct".into(), 12.5)]),
            }],
        };
        assert_eq!(
            from_bus::<ReportBatch>(&to_bus(&batch).unwrap()).unwrap(),
            batch
        );
    }

    #[test]
    fn config_messages_round_trip_and_old_registers_decode() {
        let push = ConfigPush {
            name: "nginx.conf".into(),
            version: 2,
            sha256: config_sha256(b"a\0b"),
            content: b"a\0b".to_vec(),
            validate: Some(vec!["nginx".into(), "-t".into(), "{file}".into()]),
            reload: None,
        };
        assert_eq!(
            from_bus::<ConfigPush>(&to_bus(&push).unwrap()).unwrap(),
            push
        );
        let ack = ConfigAck {
            message_id: "m".into(),
            name: "nginx.conf".into(),
            version: 2,
            sha256: push.sha256.clone(),
            status: ConfigOutcome::Failed,
            error: Some("validate".into()),
            at_ms: 5,
        };
        assert_eq!(from_bus::<ConfigAck>(&to_bus(&ack).unwrap()).unwrap(), ack);
        #[derive(Serialize)]
        struct OldRegister<'a> {
            node_id: &'a str,
            hostname: &'a str,
            version: &'a str,
        }
        let old = to_bus(&OldRegister {
            node_id: "n",
            hostname: "h",
            version: "0.1.0",
        })
        .unwrap();
        assert!(from_bus::<Register>(&old).unwrap().configs.is_empty());
        assert_eq!(
            config_sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn config_names_are_plain_file_names() {
        for ok in ["nginx.conf", "app_1-2.yaml", "a", "x..y"] {
            assert_eq!(check_config_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            ".hidden",
            "../etc/passwd",
            "a/b",
            "/abs",
            "a\\b",
            "a b",
            "a\0b",
            "é",
        ] {
            assert!(check_config_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_config_name(&"n".repeat(MAX_CONFIG_NAME_LEN + 1)),
            Err(ConfigNameError::Length)
        );
    }

    #[test]
    fn routes_are_valid_routes_and_distinct() {
        let all = [
            up::REGISTER,
            up::STATUS,
            up::REPORT,
            up::STARTED,
            up::OUTPUT,
            up::RESULT,
            up::REFUSED,
            up::CONFIG_ACK,
            up::UPGRADE_RESULT,
            down::ACK,
            down::TASK,
            down::CANCEL,
            down::CREDENTIAL,
            down::CONFIG,
            down::UPGRADE,
        ];
        let mut seen = std::collections::HashSet::new();
        for r in all {
            assert!(crate::Route::new(r).is_ok(), "{r}");
            assert!(seen.insert(r), "{r}");
        }
        assert_eq!(
            state_subject(&crate::UserId::new("n1").unwrap()),
            "fleet.agent.state.n1"
        );
    }

    fn manifest() -> UpgradeManifest {
        let sha = config_sha256(b"binary");
        UpgradeManifest {
            upgrade_id: 3,
            version: "1.2.3-rc.1+b7".into(),
            path: artifact_path(&sha),
            sha256: sha,
            size: 6,
            deadline_ms: 60_000,
            os: Some("linux".into()),
            arch: None,
        }
    }

    #[test]
    fn upgrade_messages_round_trip() {
        let m = manifest();
        assert_eq!(
            from_bus::<UpgradeManifest>(&to_bus(&m).unwrap()).unwrap(),
            m
        );
        let r = UpgradeResult {
            message_id: "m".into(),
            upgrade_id: 3,
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            status: UpgradeOutcome::RolledBack,
            error: Some("exited".into()),
            running_version: "1.2.2".into(),
            at_ms: 9,
        };
        assert_eq!(from_bus::<UpgradeResult>(&to_bus(&r).unwrap()).unwrap(), r);
    }

    #[test]
    fn manifests_are_checked_before_anything_is_downloaded() {
        assert_eq!(manifest().check("linux", "x86_64"), Ok(()));
        let bad = |f: fn(&mut UpgradeManifest)| {
            let mut m = manifest();
            f(&mut m);
            m.check("linux", "x86_64")
        };
        assert_eq!(
            bad(|m| m.sha256 = m.sha256.to_uppercase()),
            Err(ManifestError::Sha256)
        );
        assert_eq!(bad(|m| m.size = 0), Err(ManifestError::Size(0)));
        assert!(matches!(
            bad(|m| m.size = MAX_ARTIFACT_BYTES + 1),
            Err(ManifestError::Size(_))
        ));
        assert!(matches!(
            bad(|m| m.path = "https://evil.example/x".into()),
            Err(ManifestError::Path(_))
        ));
        assert!(matches!(
            bad(|m| m.path = "/v1/artifacts/../../etc/passwd".into()),
            Err(ManifestError::Path(_))
        ));
        assert_eq!(
            bad(|m| m.deadline_ms = 10),
            Err(ManifestError::Deadline(10))
        );
        for v in ["", "a b", "1/2", "é"] {
            let mut m = manifest();
            m.version = v.into();
            assert!(
                matches!(m.check("linux", "x86_64"), Err(ManifestError::Version(_))),
                "{v:?}"
            );
        }
        assert!(matches!(
            manifest().check("macos", "x86_64"),
            Err(ManifestError::Platform(_, _))
        ));
        assert!(matches!(
            bad(|m| m.arch = Some("aarch64".into())),
            Err(ManifestError::Platform(_, _))
        ));
        assert!(is_sha256_hex(&config_sha256(b"")));
        assert!(!is_sha256_hex("abc"));
    }
}
