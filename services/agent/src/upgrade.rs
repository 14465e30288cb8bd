//! Signed self-upgrades: this module owns downloading and verifying an agent binary, the
//! swap beside the running executable, the restart into it, the watchdog that restores the
//! previous binary when the new one does not come back online, and the record that carries
//! an upgrade across those restarts (`upgrade_state_path`, `upgrade.json` beside the
//! outbox).
//!
//! An `agent.upgrade` push ([`UpgradeManifest`]) is admitted by the trust gate like every
//! command (signature, node, route, lifetime, replay), so every manifest field is the control
//! plane's word. Then, in order (`docs/adr/0012-signed-agent-upgrades.md`):
//! 1. The manifest is checked ([`UpgradeManifest::check`]: SHA-256 form, size bound, the
//!    download path of that very artifact, deadline, platform). The artifact is fetched
//!    from the configured `scheduler_url` (never a host the command names) with this
//!    node's credential, streamed into `<exe>.upgrade` beside the executable while being
//!    hashed, and refused unless size and SHA-256 match. Any failure: an outboxed `failed`
//!    result, and the running binary is untouched.
//! 2. The record is written (stage `installed`) before the swap; the running binary is
//!    kept as `<exe>.previous` (hard link, or copy), and `<exe>.upgrade` is renamed over
//!    `<exe>` (atomic). The agent reports `installed` and stops its connection.
//! 3. The old process, now the watchdog ([`hand_over`]), starts `<exe>` as a child with
//!    `AGENT_UPGRADE_PROBE=1`. That child runs a full agent: it connects, registers and
//!    then marks the record `probed`. The watchdog then stops the child (SIGTERM) and
//!    execs `<exe>` in its own place, so the process manager keeps watching the same PID,
//!    and the new agent reports `completed` at its start.
//! 4. If the child exits first, or has not registered when the deadline passes, the
//!    watchdog kills it, renames `<exe>.previous` back over `<exe>`, records `rolled_back`
//!    with the reason and execs the restored binary, which reports it.
//!
//! If the watchdog itself dies during step 3 (power cut, `kill -9`), the process manager
//! restarts `<exe>`, which is then the new binary: it finds the record in `installed` or
//! `probing` and acts as the watchdog again (at most [`MAX_PROBES`] times, then it rolls
//! back). A new binary so broken that it cannot even do that is the one case left to the
//! operator (`docs/operations.md`).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use messages::fleet::{UpgradeManifest, UpgradeOutcome, UpgradeResult};
use messages::payload;
use serde::{Deserialize, Serialize};
use servicekit::clock::now_ms;
use sha2::Digest;
use tokio::sync::mpsc;

use crate::config::{AgentConfig, Token};
use crate::executor::ExecEvent;
use crate::outbox::Outbox;

/// Outbox entry kind of an upgrade report (a msgpack [`UpgradeResult`]).
pub const UPGRADE_RESULT_KIND: &str = "upgrade_result";

/// Set on the child the watchdog tries the new binary in.
pub const PROBE_ENV: &str = "AGENT_UPGRADE_PROBE";

/// How often a new binary is tried before the watchdog gives up and rolls back, counting
/// watchdogs that died while trying.
pub const MAX_PROBES: u32 = 3;

/// Longest a whole download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How often the watchdog looks at the child and the record.
const PROBE_POLL: Duration = Duration::from_millis(100);
/// How long a probed child gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Chunks in flight between the download and the file writer.
const WRITE_QUEUE: usize = 16;

/// Where an upgrade stands on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Recorded just before the swap; the new binary has not run yet.
    Installed,
    /// The watchdog is trying the new binary (its `attempt`-th try).
    Probing {
        /// 1-based.
        attempt: u32,
    },
    /// The new binary registered while probed; the watchdog hands over to it.
    Probed,
    /// The previous binary was restored.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// Nothing was swapped after all (interrupted before the rename).
    Failed {
        /// Why.
        reason: String,
    },
}

/// The upgrade record (`upgrade.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The manifest's id.
    pub upgrade_id: u64,
    /// The target version.
    pub version: String,
    /// The artifact's SHA-256.
    pub sha256: String,
    /// The executable replaced.
    pub exe: PathBuf,
    /// Where the replaced binary is kept.
    pub previous: PathBuf,
    /// How long the new binary gets to register, ms.
    pub deadline_ms: u64,
    /// The version that installed it.
    pub from_version: String,
    /// Where it stands.
    #[serde(flatten)]
    pub stage: Stage,
}

/// Why the record or the watchdog failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Reading, writing or removing the record failed.
    #[error("upgrade record {path}: {source}")]
    Io {
        /// The record file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The record is not the JSON this module writes.
    #[error("upgrade record {path}: {source}")]
    Json {
        /// The record file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// [`hand_over`] was called without an upgrade in progress.
    #[error("no upgrade is in progress")]
    NoRecord,
    /// `exec` of the binary failed (it returns only on failure).
    #[error("cannot exec {path}: {source}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The outbox refused the report.
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    /// The report could not be encoded.
    #[error("cannot encode the upgrade report: {0}")]
    Encode(#[from] payload::PayloadError),
}

/// Reads the record; `None` when no upgrade is in progress. Blocking.
pub fn read_record(path: &Path) -> Result<Option<Record>, UpgradeError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| UpgradeError::Json {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(UpgradeError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the record atomically. Blocking (fsync).
pub fn write_record(path: &Path, record: &Record) -> Result<(), UpgradeError> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|source| UpgradeError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    crate::trust::write_atomically(path, &bytes).map_err(|source| UpgradeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn clear_record(path: &Path) -> Result<(), UpgradeError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(UpgradeError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What `main` does at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Run the agent.
    Run,
    /// An upgrade was installed but its watchdog is gone: be the watchdog ([`hand_over`]).
    Watch,
}

/// Decides, from the record, whether this start runs the agent or resumes a watchdog that
/// died. A probe child always runs. Blocking.
pub fn boot(config: &AgentConfig) -> Result<Boot, UpgradeError> {
    if config.upgrade_probe {
        return Ok(Boot::Run);
    }
    Ok(match read_record(&config.upgrade_state_path)? {
        Some(Record {
            stage: Stage::Installed | Stage::Probing { .. },
            ..
        }) => Boot::Watch,
        _ => Boot::Run,
    })
}

/// At agent start (not in a probe): turns a finished upgrade's record into an outboxed
/// report (`completed`, `rolled_back` or `failed`) and removes it. The report is written
/// before the record goes, so a crash in between reports twice rather than never (the
/// scheduler ingests idempotently by state). Blocking.
pub fn settle(config: &AgentConfig, outbox: &Outbox) -> Result<(), UpgradeError> {
    if config.upgrade_probe {
        return Ok(());
    }
    let path = &config.upgrade_state_path;
    let record = match read_record(path) {
        Ok(Some(record)) => record,
        Ok(None) => return Ok(()),
        // A record nobody can read must not keep the agent from starting: it is set aside
        // for the operator and the upgrade is left unreported (the scheduler shows it
        // overdue).
        Err(e) => {
            tracing::error!(error = %e, "Unreadable upgrade record; moving it aside.");
            let mut aside = path.as_os_str().to_owned();
            aside.push(".unreadable");
            let _ = std::fs::rename(path, PathBuf::from(aside));
            return Ok(());
        }
    };
    let (status, error) = match &record.stage {
        Stage::Probed => (UpgradeOutcome::Completed, None),
        Stage::RolledBack { reason } => (UpgradeOutcome::RolledBack, Some(reason.clone())),
        Stage::Failed { reason } => (UpgradeOutcome::Failed, Some(reason.clone())),
        // A watchdog's business (see `boot`).
        Stage::Installed | Stage::Probing { .. } => return Ok(()),
    };
    tracing::info!(
        upgrade_id = record.upgrade_id,
        version = %record.version,
        ?status,
        error = error.as_deref().unwrap_or(""),
        running = %config.reported_version,
        "Upgrade finished."
    );
    let result = report(
        &record.version,
        &record.sha256,
        record.upgrade_id,
        status,
        error,
        config,
    );
    append_result(outbox, result)?;
    clear_record(path)
}

fn report(
    version: &str,
    sha256: &str,
    upgrade_id: u64,
    status: UpgradeOutcome,
    error: Option<String>,
    config: &AgentConfig,
) -> UpgradeResult {
    UpgradeResult {
        message_id: String::new(),
        upgrade_id,
        version: version.to_owned(),
        sha256: sha256.to_owned(),
        status,
        error,
        running_version: config.reported_version.clone(),
        at_ms: now_ms(),
    }
}

/// Appends a report to the outbox with its message id; returns the sequence and payload.
fn append_result(outbox: &Outbox, result: UpgradeResult) -> Result<(u64, Vec<u8>), UpgradeError> {
    let mut written = Vec::new();
    let seq = outbox.append_with(UPGRADE_RESULT_KIND, |id| {
        let mut result = result;
        result.message_id = id.to_string();
        written = payload::to_bus(&result)?;
        Ok::<_, UpgradeError>(written.clone())
    })?;
    Ok((seq, written))
}

/// In a probe child, once registered: tells the watchdog the new binary works. Blocking.
pub fn mark_probed(path: &Path) -> Result<(), UpgradeError> {
    match read_record(path)? {
        Some(mut record) if matches!(record.stage, Stage::Probing { .. }) => {
            record.stage = Stage::Probed;
            write_record(path, &record)
        }
        _ => Ok(()),
    }
}

/// What the upgrade task needs from the agent (cloned out of its configuration).
#[derive(Debug, Clone)]
pub struct Upgrader {
    config: Arc<AgentConfig>,
    outbox: Arc<Outbox>,
    events: mpsc::UnboundedSender<ExecEvent>,
    /// An upgrade is under way: a second one is refused until it failed.
    busy: Arc<AtomicBool>,
}

impl Upgrader {
    /// For the running agent.
    pub fn new(
        config: AgentConfig,
        outbox: Arc<Outbox>,
        events: mpsc::UnboundedSender<ExecEvent>,
    ) -> Self {
        Upgrader {
            config: Arc::new(config),
            outbox,
            events,
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Claims the one upgrade slot; `false` while another upgrade runs (or installed).
    pub fn begin(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Runs one upgrade (after [`Upgrader::begin`]) to its end: reports `downloading`, then either `failed` (nothing
    /// changed) or `installed` followed by [`ExecEvent::UpgradeInstalled`], on which the
    /// connection loop stops so `main` can hand over ([`hand_over`]).
    pub async fn run(self, manifest: UpgradeManifest, token: Token) {
        self.send(&manifest, UpgradeOutcome::Downloading, None)
            .await;
        match self.install(&manifest, &token).await {
            Ok(()) => {
                tracing::info!(upgrade_id = manifest.upgrade_id, version = %manifest.version, "Upgrade installed; restarting into it.");
                self.send(&manifest, UpgradeOutcome::Installed, None).await;
                let _ = self.events.send(ExecEvent::UpgradeInstalled);
            }
            Err(e) => {
                tracing::error!(upgrade_id = manifest.upgrade_id, error = %e, "Upgrade failed; the running binary is unchanged.");
                self.send(&manifest, UpgradeOutcome::Failed, Some(e)).await;
                self.busy.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Reports that another upgrade is still under way (the new one is not started).
    pub async fn busy(self, manifest: UpgradeManifest) {
        self.send(
            &manifest,
            UpgradeOutcome::Failed,
            Some("another upgrade is in progress on this agent".into()),
        )
        .await;
    }

    async fn send(&self, m: &UpgradeManifest, status: UpgradeOutcome, error: Option<String>) {
        let result = report(
            &m.version,
            &m.sha256,
            m.upgrade_id,
            status,
            error,
            &self.config,
        );
        let outbox = Arc::clone(&self.outbox);
        match tokio::task::spawn_blocking(move || append_result(&outbox, result)).await {
            Ok(Ok((seq, payload))) => {
                let _ = self.events.send(ExecEvent::UpgradeResult { seq, payload });
            }
            Ok(Err(e)) => tracing::error!(error = %e, "Cannot record an upgrade report."),
            Err(e) => tracing::error!(error = %e, "Cannot record an upgrade report."),
        }
    }

    /// Steps 1 and 2 of the module docs; `Err` is the report's error text.
    async fn install(&self, m: &UpgradeManifest, token: &Token) -> Result<(), String> {
        m.check(std::env::consts::OS, std::env::consts::ARCH)
            .map_err(|e| format!("manifest refused: {e}"))?;
        let base = self.config.scheduler_url.as_deref().ok_or(
            "this agent has no scheduler_url (AGENT_SCHEDULER_URL) to download from; nothing was installed",
        )?;
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the running executable: {e}"))?;
        let paths = Paths::beside(&exe);
        if self.config.upgrade_probe {
            return Err(
                "this agent is itself a new binary on trial; try again once it runs".into(),
            );
        }
        let client = servicekit::http_client::client(servicekit::http_client::ClientOptions {
            roots: download_roots(&self.config, base)?,
            pins: Vec::new(),
            timeout: Some(DOWNLOAD_TIMEOUT),
        })
        .map_err(|e| format!("HTTP client: {e}"))?;
        let url = format!("{base}{}", m.path);
        download(&client, &url, token, m, &paths.staged).await?;
        let record = Record {
            upgrade_id: m.upgrade_id,
            version: m.version.clone(),
            sha256: m.sha256.clone(),
            exe: paths.exe.clone(),
            previous: paths.previous.clone(),
            deadline_ms: m.deadline_ms,
            from_version: self.config.reported_version.clone(),
            stage: Stage::Installed,
        };
        let state = self.config.upgrade_state_path.clone();
        tokio::task::spawn_blocking(move || swap(&paths, &record, &state))
            .await
            .map_err(|e| format!("install task: {e}"))?
    }
}

/// The trust anchors for an `https://` scheduler: the configured CA file or the system's.
fn download_roots(
    config: &AgentConfig,
    base: &str,
) -> Result<servicekit::tls::RootCertStore, String> {
    if !base.to_ascii_lowercase().starts_with("https://") {
        return Ok(servicekit::tls::RootCertStore::empty());
    }
    match &config.tls.ca_file {
        Some(path) => servicekit::tls::roots_from_file(path),
        None => servicekit::tls::platform_roots(),
    }
    .map_err(|e| format!("TLS trust anchors: {e}"))
}

/// The files of an upgrade beside executable `exe`.
#[derive(Debug, Clone)]
struct Paths {
    exe: PathBuf,
    staged: PathBuf,
    previous: PathBuf,
}

impl Paths {
    fn beside(exe: &Path) -> Paths {
        let with = |suffix: &str| {
            let mut name = exe.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        Paths {
            exe: exe.to_path_buf(),
            staged: with(".upgrade"),
            previous: with(".previous"),
        }
    }
}

/// Streams the artifact into `dest` while hashing it; refuses a wrong status, size or
/// SHA-256 (and removes `dest`).
async fn download(
    client: &reqwest::Client,
    url: &str,
    token: &Token,
    m: &UpgradeManifest,
    dest: &Path,
) -> Result<(), String> {
    let result = fetch(client, url, token, m, dest).await;
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    token: &Token,
    m: &UpgradeManifest,
    dest: &Path,
) -> Result<(), String> {
    let mut response = client
        .get(url)
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|e| format!("download from {url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("download from {url} refused: HTTP {status}"));
    }
    if let Some(len) = response.content_length()
        && len != m.size
    {
        return Err(format!(
            "the artifact is {len} bytes; the signed manifest says {}",
            m.size
        ));
    }
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(WRITE_QUEUE);
    let writer = {
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || write_hashed(&dest, rx))
    };
    let mut received: u64 = 0;
    let mut failure = None;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                received = received.saturating_add(chunk.len() as u64);
                if received > m.size {
                    failure = Some(format!(
                        "the artifact is larger than the {} bytes the signed manifest says",
                        m.size
                    ));
                    break;
                }
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(format!("download from {url}: {e}"));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| format!("writer task: {e}"))?
        .map_err(|e| format!("cannot write {}: {e}", dest.display()));
    if let Some(failure) = failure {
        return Err(failure);
    }
    let sha256 = written?;
    verify(m, received, &sha256)
}

/// The artifact as received must be the one the signed manifest names.
fn verify(m: &UpgradeManifest, size: u64, sha256: &str) -> Result<(), String> {
    if size != m.size {
        return Err(format!(
            "the artifact is {size} bytes; the signed manifest says {}",
            m.size
        ));
    }
    if sha256 != m.sha256 {
        return Err(format!(
            "sha256 mismatch: the artifact hashes to {sha256}, the signed manifest says {}; nothing was installed",
            m.sha256
        ));
    }
    Ok(())
}

/// Writes the chunks to `dest` (owner-only until verified), fsyncs, returns the SHA-256.
fn write_hashed(dest: &Path, mut chunks: mpsc::Receiver<bytes::Bytes>) -> std::io::Result<String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dest)?;
    let mut hasher = sha2::Sha256::new();
    while let Some(chunk) = chunks.blocking_recv() {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, hex. Blocking.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// Step 2: record, keep the old binary, rename the new one over it. Blocking.
fn swap(paths: &Paths, record: &Record, state: &Path) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| {
        let _ = std::fs::remove_file(&paths.staged);
        format!("{what}: {e}; nothing was installed")
    };
    std::fs::set_permissions(&paths.staged, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| io("cannot make the new binary executable", e))?;
    // A stale previous binary from an older upgrade goes; the running one takes its place.
    match std::fs::remove_file(&paths.previous) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove the old previous binary", e)),
    }
    if std::fs::hard_link(&paths.exe, &paths.previous).is_err() {
        std::fs::copy(&paths.exe, &paths.previous)
            .and_then(|_| std::fs::File::open(&paths.previous)?.sync_all())
            .map_err(|e| io("cannot keep the running binary as previous", e))?;
    }
    // Recorded before the rename: a crash after it leaves a record the next start acts on.
    write_record(state, record).map_err(|e| {
        let _ = std::fs::remove_file(&paths.staged);
        format!("{e}; nothing was installed")
    })?;
    if let Err(e) = std::fs::rename(&paths.staged, &paths.exe) {
        let _ = clear_record(state);
        return Err(io("cannot replace the running binary", e));
    }
    if let Some(dir) = paths.exe.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// The watchdog (step 3 and 4 of the module docs), called by `main` after the agent
/// stopped for an installed upgrade, or at a start that found the watchdog gone. Blocking.
/// On success it does not return: the process becomes the new binary, or the restored
/// previous one. It returns only when nothing can be exec'd.
pub fn hand_over(config: &AgentConfig) -> UpgradeError {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let path = &config.upgrade_state_path;
    let mut record = match read_record(path) {
        Ok(Some(record)) => record,
        Ok(None) => return UpgradeError::NoRecord,
        Err(e) => return e,
    };
    let attempt = match record.stage {
        Stage::Installed => 1,
        Stage::Probing { attempt } => attempt.saturating_add(1),
        // Settled already: run whatever is installed.
        Stage::Probed | Stage::RolledBack { .. } | Stage::Failed { .. } => {
            return exec(&record.exe, &args);
        }
    };
    // The rename may not have happened (a crash between record and rename).
    match sha256_file(&record.exe) {
        Ok(sha) if sha == record.sha256 => {}
        Ok(_) => {
            record.stage = Stage::Failed {
                reason:
                    "the installation was interrupted before the new binary replaced the old one"
                        .into(),
            };
            if let Err(e) = write_record(path, &record) {
                return e;
            }
            return exec(&record.exe, &args);
        }
        Err(e) => {
            return roll_back(
                path,
                record,
                &args,
                &format!("cannot read the new binary: {e}"),
            );
        }
    }
    if attempt > MAX_PROBES {
        let reason = format!("the new binary was tried {MAX_PROBES} times and never registered");
        return roll_back(path, record, &args, &reason);
    }
    record.stage = Stage::Probing { attempt };
    if let Err(e) = write_record(path, &record) {
        return e;
    }
    let deadline = Duration::from_millis(record.deadline_ms);
    tracing::info!(exe = %record.exe.display(), version = %record.version, attempt, ?deadline, "Trying the new binary.");
    match probe(&record.exe, &args, path, deadline) {
        Probe::Registered => {
            tracing::info!(version = %record.version, "The new binary registered; handing over to it.");
            exec(&record.exe, &args)
        }
        Probe::Failed(reason) => roll_back(path, record, &args, &reason),
    }
}

enum Probe {
    Registered,
    Failed(String),
}

/// Runs `exe` as a probe child until it marks the record `probed` (then stops it), exits,
/// or `deadline` passes (then kills it).
fn probe(exe: &Path, args: &[OsString], record: &Path, deadline: Duration) -> Probe {
    let mut child = match std::process::Command::new(exe)
        .args(args)
        .env(PROBE_ENV, "1")
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Probe::Failed(format!("the new binary could not be started: {e}")),
    };
    let started = Instant::now();
    loop {
        std::thread::sleep(PROBE_POLL);
        if matches!(
            read_record(record),
            Ok(Some(Record {
                stage: Stage::Probed,
                ..
            }))
        ) {
            stop(&mut child);
            return Probe::Registered;
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return Probe::Failed(format!(
                    "the new binary exited ({status}) before it registered"
                ));
            }
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Probe::Failed(format!("cannot watch the new binary: {e}"));
            }
        }
        if started.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Probe::Failed(format!(
                "the new binary did not register within {} s",
                deadline.as_secs_f64()
            ));
        }
    }
}

/// SIGTERM (a graceful agent stop closes its outbox), then SIGKILL after [`STOP_GRACE`].
fn stop(child: &mut std::process::Child) {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(PROBE_POLL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Restores `<exe>.previous`, records why, and execs it.
fn roll_back(path: &Path, mut record: Record, args: &[OsString], reason: &str) -> UpgradeError {
    tracing::error!(version = %record.version, %reason, "Rolling back to the previous binary.");
    let reason = match std::fs::rename(&record.previous, &record.exe) {
        Ok(()) => {
            if let Some(dir) = record.exe.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            reason.to_owned()
        }
        Err(e) => format!("{reason}; and the previous binary could not be restored: {e}"),
    };
    record.stage = Stage::RolledBack { reason };
    if let Err(e) = write_record(path, &record) {
        return e;
    }
    exec(&record.exe, args)
}

/// Replaces this process with `exe` (same arguments and environment, without the probe
/// marker). Returns only on failure.
fn exec(exe: &Path, args: &[OsString]) -> UpgradeError {
    let source = std::process::Command::new(exe)
        .args(args)
        .env_remove(PROBE_ENV)
        .exec();
    UpgradeError::Exec {
        path: exe.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use messages::fleet;

    fn manifest(content: &[u8]) -> UpgradeManifest {
        let sha256 = fleet::config_sha256(content);
        UpgradeManifest {
            upgrade_id: 1,
            version: "2.0.0".into(),
            path: fleet::artifact_path(&sha256),
            sha256,
            size: content.len() as u64,
            deadline_ms: 5_000,
            os: None,
            arch: None,
        }
    }

    #[test]
    fn only_the_signed_size_and_hash_are_accepted() {
        let m = manifest(b"#!/bin/sh\n");
        assert_eq!(
            verify(&m, 10, &fleet::config_sha256(b"#!/bin/sh\n")),
            Ok(())
        );
        assert!(verify(&m, 9, &m.sha256).unwrap_err().contains("bytes"));
        let tampered = fleet::config_sha256(b"#!/bin/sh\nx");
        assert!(
            verify(&m, 10, &tampered)
                .unwrap_err()
                .contains("sha256 mismatch")
        );
    }

    #[test]
    fn streamed_writes_hash_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("agent.upgrade");
        let (tx, rx) = mpsc::channel(4);
        let writer = std::thread::spawn({
            let dest = dest.clone();
            move || write_hashed(&dest, rx)
        });
        for part in [&b"ab"[..], b"cd"] {
            tx.blocking_send(bytes::Bytes::copy_from_slice(part))
                .unwrap();
        }
        drop(tx);
        let sha = writer.join().unwrap().unwrap();
        assert_eq!(sha, fleet::config_sha256(b"abcd"));
        assert_eq!(std::fs::read(&dest).unwrap(), b"abcd");
        assert_eq!(sha256_file(&dest).unwrap(), sha);
    }

    #[test]
    fn the_swap_keeps_the_previous_binary_and_records_first() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("agent");
        std::fs::write(&exe, b"old").unwrap();
        let paths = Paths::beside(&exe);
        std::fs::write(&paths.staged, b"new").unwrap();
        let state = dir.path().join("upgrade.json");
        let record = Record {
            upgrade_id: 4,
            version: "2".into(),
            sha256: fleet::config_sha256(b"new"),
            exe: exe.clone(),
            previous: paths.previous.clone(),
            deadline_ms: 1_000,
            from_version: "1".into(),
            stage: Stage::Installed,
        };
        swap(&paths, &record, &state).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(&paths.previous).unwrap(), b"old");
        assert!(!paths.staged.exists());
        let mode = std::fs::metadata(&exe).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(read_record(&state).unwrap(), Some(record.clone()));

        // A probe marks it; anything but a probing record is left alone.
        mark_probed(&state).unwrap();
        assert_eq!(
            read_record(&state).unwrap().unwrap().stage,
            Stage::Installed
        );
        let mut probing = record;
        probing.stage = Stage::Probing { attempt: 1 };
        write_record(&state, &probing).unwrap();
        mark_probed(&state).unwrap();
        assert_eq!(read_record(&state).unwrap().unwrap().stage, Stage::Probed);
        clear_record(&state).unwrap();
        assert_eq!(read_record(&state).unwrap(), None);
        clear_record(&state).unwrap();
    }

    #[test]
    fn a_garbled_record_is_an_error_not_a_panic_and_does_not_stop_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("upgrade.json");
        std::fs::write(&state, b"{").unwrap();
        assert!(matches!(
            read_record(&state),
            Err(UpgradeError::Json { .. })
        ));
        let config = config(dir.path());
        assert!(boot(&config).is_err());
        let outbox = Outbox::open(dir.path().join("outbox.redb")).unwrap();
        settle(&config, &outbox).unwrap();
        assert!(!state.exists());
        assert!(dir.path().join("upgrade.json.unreadable").exists());
        assert!(outbox.is_empty().unwrap());
    }

    fn config(dir: &Path) -> AgentConfig {
        std::fs::write(dir.join("command.pub"), COMMAND_PUBLIC).unwrap();
        let toml = r#"
node_id = "n1"
token = "t"
gateways = ["ws://127.0.0.1:1/ws"]
outbox_path = "outbox.redb"
command_keys_file = "command.pub"
"#;
        AgentConfig::from_toml(toml, &dir.join("agent.toml"), |_| None).unwrap()
    }

    const COMMAND_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEALTHYjnKlw7ZNdriaHg3X2s7dv4STBmcwKlO9MOAPCRg=
-----END PUBLIC KEY-----
";

    #[test]
    fn finished_upgrades_are_reported_once_at_start_and_unfinished_ones_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        assert_eq!(boot(&config).unwrap(), Boot::Run);
        let mut record = Record {
            upgrade_id: 7,
            version: "2.0".into(),
            sha256: fleet::config_sha256(b"new"),
            exe: dir.path().join("agent"),
            previous: dir.path().join("agent.previous"),
            deadline_ms: 1_000,
            from_version: "1.0".into(),
            stage: Stage::Probing { attempt: 1 },
        };
        write_record(&config.upgrade_state_path, &record).unwrap();
        // The watchdog died while probing: this start watches; a probe child runs.
        assert_eq!(boot(&config).unwrap(), Boot::Watch);
        let mut probe = config.clone();
        probe.upgrade_probe = true;
        assert_eq!(boot(&probe).unwrap(), Boot::Run);
        let outbox = Outbox::open(dir.path().join("outbox.redb")).unwrap();
        // Nothing to report while it is unfinished.
        settle(&config, &outbox).unwrap();
        assert!(outbox.is_empty().unwrap());

        record.stage = Stage::RolledBack {
            reason: "exited".into(),
        };
        write_record(&config.upgrade_state_path, &record).unwrap();
        assert_eq!(boot(&config).unwrap(), Boot::Run);
        // A probe child never settles: that is the restored or new binary's job.
        settle(&probe, &outbox).unwrap();
        assert!(outbox.is_empty().unwrap());
        settle(&config, &outbox).unwrap();
        let entries = outbox.pending(10).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].kind, UPGRADE_RESULT_KIND);
        let report: UpgradeResult = payload::from_bus(&entries[0].payload).unwrap();
        assert_eq!(report.status, UpgradeOutcome::RolledBack);
        assert_eq!(report.error.as_deref(), Some("exited"));
        assert_eq!(report.upgrade_id, 7);
        assert!(!report.message_id.is_empty());
        assert!(!config.upgrade_state_path.exists());
        // Reported once.
        settle(&config, &outbox).unwrap();
        assert_eq!(outbox.pending(10).unwrap().len(), 1);
    }
}
