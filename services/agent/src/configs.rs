//! Config documents pushed by the control plane (not the agent's own configuration, which
//! is [`crate::config`]): each `agent.config` push ([`ConfigPush`]) is one version of one
//! named file, written into the configured `config_dir` and acknowledged with an outboxed
//! [`ConfigAck`].
//!
//! Applying one version, in this order:
//! 1. The name must be a plain file name ([`fleet::check_config_name`]; the connection loop
//!    refuses and reports a push whose name is not, before it gets here), the content must
//!    match its SHA-256, and the validate and reload commands must pass the execution
//!    policy (the allowlist tasks use). Any failure: nothing is written.
//! 2. The content goes to a temp file in `config_dir` (a dot name no document can have),
//!    which is fsynced.
//! 3. `validate`, if any, runs with `{file}` standing for the temp file; if it fails the
//!    temp file is removed and the old file is untouched.
//! 4. The temp file is renamed over `<config_dir>/<name>` and the directory fsynced: a crash
//!    leaves the old file or the new one, never a mix.
//! 5. The version is recorded in `config_state_path` (atomically), so a restarted agent
//!    reports truthfully what it applied.
//! 6. `reload`, if any, runs with `{file}` standing for the final path; if it fails the file
//!    stays (it passed validation) and the ack says `failed` with the reason.
//!
//! A version whose content is already on disk is acked `applied` without rewriting or
//! reloading. Pushes are applied one at a time, in arrival order, by one worker
//! ([`spawn_worker`]), so two versions of one file never race. At every register the agent
//! reports, per document it applied, the version and the SHA-256 of the file as it is on
//! disk now ([`Configs::report`]); a file changed locally shows up as a different hash and
//! the scheduler pushes the desired version again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use messages::fleet::{
    self, AppliedConfig, ConfigAck, ConfigOutcome, ConfigPush, Outcome, TaskKind,
};
use messages::payload;
use servicekit::clock::now_ms;
use tokio::sync::{mpsc, oneshot};

use crate::executor::{ExecEvent, Execution};
use crate::outbox::Outbox;
use crate::policy::ExecPolicy;

/// Outbox entry kind of a config ack (a msgpack [`ConfigAck`]).
pub(crate) const CONFIG_ACK_KIND: &str = "config_ack";

/// The placeholder in validate and reload arguments for the file's path.
pub(crate) const FILE_PLACEHOLDER: &str = "{file}";

/// Most bytes of a failed command's output quoted in an ack's error.
const ERROR_OUTPUT: usize = 512;

/// Why the applied-versions state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the file failed.
    #[error("config state {path}: {source}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the JSON this module writes.
    #[error("config state {path}: {source}")]
    Json {
        /// The state file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// The documents this agent applied, and where they live.
#[derive(Debug)]
pub(crate) struct Configs {
    dir: Option<PathBuf>,
    state_path: PathBuf,
    /// Applied version and its SHA-256, by name (mirrors the state file).
    applied: Mutex<BTreeMap<String, AppliedConfig>>,
}

impl Configs {
    /// Reads what an earlier run applied (a missing state file is an empty one). Blocking.
    pub(crate) fn open(dir: Option<PathBuf>, state_path: PathBuf) -> Result<Configs, StateError> {
        let applied = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Json {
                path: state_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(StateError::Io {
                    path: state_path,
                    source,
                });
            }
        };
        Ok(Configs {
            dir,
            state_path,
            applied: Mutex::new(applied),
        })
    }

    /// What to report at a register: per applied document its version and the SHA-256 of
    /// the file as it is now (empty when the file is gone). Blocking (reads the files).
    pub(crate) fn report(&self) -> BTreeMap<String, AppliedConfig> {
        let applied = self.snapshot();
        applied
            .into_iter()
            .map(|(name, a)| {
                let sha256 = self
                    .dir
                    .as_ref()
                    .and_then(|d| std::fs::read(d.join(&name)).ok())
                    .map(|bytes| fleet::config_sha256(&bytes))
                    .unwrap_or_default();
                (
                    name,
                    AppliedConfig {
                        version: a.version,
                        sha256,
                    },
                )
            })
            .collect()
    }

    /// The applied versions as recorded.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, AppliedConfig> {
        self.applied.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Records `name` at `version` (memory and state file). Blocking (fsync).
    fn record(&self, name: &str, version: u64, sha256: &str) -> Result<(), StateError> {
        let mut applied = self.snapshot();
        applied.insert(
            name.to_owned(),
            AppliedConfig {
                version,
                sha256: sha256.to_owned(),
            },
        );
        let bytes = serde_json::to_vec_pretty(&applied).map_err(|source| StateError::Json {
            path: self.state_path.clone(),
            source,
        })?;
        crate::trust::write_atomically(&self.state_path, &bytes).map_err(|source| {
            StateError::Io {
                path: self.state_path.clone(),
                source,
            }
        })?;
        if let Ok(mut a) = self.applied.lock() {
            *a = applied;
        }
        Ok(())
    }

    /// Applies `push` (see the module docs); `Err` is the ack's error text.
    pub(crate) async fn apply(
        self: &Arc<Self>,
        push: &ConfigPush,
        policy: &ExecPolicy,
    ) -> Result<(), String> {
        fleet::check_config_name(&push.name).map_err(|e| e.to_string())?;
        let dir = self
            .dir
            .clone()
            .ok_or("this agent has no config_dir (AGENT_CONFIG_DIR); nothing was written")?;
        if fleet::config_sha256(&push.content) != push.sha256 {
            return Err("the content does not match its sha256; nothing was written".into());
        }
        for (what, argv) in [("validate", &push.validate), ("reload", &push.reload)] {
            if let Some(argv) = argv {
                policy
                    .prepare(argv, &BTreeMap::new(), None)
                    .map_err(|e| format!("{what} command refused: {e}; nothing was written"))?;
            }
        }
        let target = dir.join(&push.name);
        let (this, content, sha) = (Arc::clone(self), push.content.clone(), push.sha256.clone());
        let (name, version) = (push.name.clone(), push.version);
        let staged = {
            let (dir, target) = (dir.clone(), target.clone());
            blocking(move || {
                // Already there (a re-push after a lost ack, a rollback to equal content).
                if std::fs::read(&target).is_ok_and(|b| fleet::config_sha256(&b) == sha) {
                    this.record(&name, version, &sha)
                        .map_err(|e| e.to_string())?;
                    return Ok(None);
                }
                write_temp(&dir, &name, &content)
                    .map(Some)
                    .map_err(|e| format!("cannot write into {}: {e}", dir.display()))
            })
            .await?
        };
        let Some(tmp) = staged else {
            return Ok(());
        };
        if let Some(argv) = &push.validate
            && let Err(e) = run(argv, &tmp, policy).await
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("validate failed: {e}; the old file is untouched"));
        }
        {
            let (this, tmp, target, dir) = (Arc::clone(self), tmp.clone(), target.clone(), dir);
            let (name, sha) = (push.name.clone(), push.sha256.clone());
            blocking(move || {
                std::fs::rename(&tmp, &target)
                    .and_then(|()| std::fs::File::open(&dir)?.sync_all())
                    .map_err(|e| {
                        let _ = std::fs::remove_file(&tmp);
                        format!("cannot replace {}: {e}", target.display())
                    })?;
                this.record(&name, version, &sha)
                    .map_err(|e| format!("applied, but the version could not be recorded: {e}"))
            })
            .await?;
        }
        if let Some(argv) = &push.reload {
            run(argv, &target, policy)
                .await
                .map_err(|e| format!("applied, but reload failed: {e}"))?;
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("config task failed: {e}"))?
}

/// Writes `content` to a fresh temp file in `dir` and fsyncs it.
fn write_temp(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let suffix: u64 = rand::random();
    // A leading dot: no document name can collide with a temp file.
    let tmp = dir.join(format!(".{name}.{suffix:016x}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    let written = f.write_all(content).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Runs a validate or reload command (through the execution policy) with `{file}` as
/// `file`; `Err` says how it failed.
async fn run(argv: &[String], file: &Path, policy: &ExecPolicy) -> Result<(), String> {
    let path = file.to_string_lossy();
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.replace(FILE_PLACEHOLDER, &path))
        .collect();
    let timeout = policy.timeout_for(0).map_err(|e| e.to_string())?;
    // Never cancelled: the sender lives until the command ends.
    let (_keep, cancel) = oneshot::channel();
    let spec = TaskKind::Command {
        argv: argv.clone(),
        env: BTreeMap::new(),
        cwd: None,
    };
    let e: Execution = crate::executor::execute(&spec, policy, timeout, cancel).await;
    if e.outcome == Outcome::Succeeded {
        return Ok(());
    }
    let mut why = match (e.exit_code, &e.error) {
        (_, Some(error)) => error.clone(),
        (Some(code), None) => format!("exit {code}"),
        (None, None) => format!("{:?}", e.outcome),
    };
    let output = if e.stderr_tail.trim().is_empty() {
        e.stdout_tail.trim()
    } else {
        e.stderr_tail.trim()
    };
    if !output.is_empty() {
        let start = output
            .char_indices()
            .map(|(i, _)| i)
            .find(|i| output.len() - i <= ERROR_OUTPUT)
            .unwrap_or(0);
        why.push_str(": ");
        why.push_str(&output[start..]);
    }
    Err(format!("{} {why}", argv.join(" ")))
}

/// Starts the worker that applies pushes one at a time, writes each ack to the outbox and
/// hands it to the connection loop ([`ExecEvent::ConfigAck`]). Returns the sender the loop
/// queues verified pushes on and the worker's task, which ends once the sender is dropped
/// (after the push under way, if any).
pub(crate) fn spawn_worker(
    configs: Arc<Configs>,
    policy: ExecPolicy,
    outbox: Arc<Outbox>,
    events: mpsc::UnboundedSender<ExecEvent>,
) -> (
    mpsc::UnboundedSender<ConfigPush>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<ConfigPush>();
    let worker = tokio::spawn(async move {
        while let Some(push) = rx.recv().await {
            let outcome = configs.apply(&push, &policy).await;
            match &outcome {
                Ok(()) => {
                    tracing::info!(name = %push.name, version = push.version, "Config applied.");
                }
                Err(e) => {
                    tracing::warn!(name = %push.name, version = push.version, error = %e, "Config not applied.");
                }
            }
            let ack = ConfigAck {
                message_id: String::new(),
                name: push.name,
                version: push.version,
                sha256: push.sha256,
                status: if outcome.is_ok() {
                    ConfigOutcome::Applied
                } else {
                    ConfigOutcome::Failed
                },
                error: outcome.err(),
                at_ms: now_ms(),
            };
            match store_ack(&outbox, ack).await {
                Ok((seq, payload)) => {
                    let _ = events.send(ExecEvent::ConfigAck { seq, payload });
                }
                Err(e) => {
                    tracing::error!(error = %e, "Config ack lost: cannot write it to the outbox.");
                }
            }
        }
    });
    (tx, worker)
}

/// Writes `ack` to the outbox with its own message id; returns the sequence and the bytes.
async fn store_ack(
    outbox: &Arc<Outbox>,
    ack: ConfigAck,
) -> Result<(u64, Vec<u8>), crate::executor::ExecError> {
    let outbox = Arc::clone(outbox);
    tokio::task::spawn_blocking(move || {
        let mut encoded = Vec::new();
        let seq = outbox.append_with(CONFIG_ACK_KIND, |id| {
            let mut ack = ack;
            ack.message_id = id.to_string();
            encoded = payload::to_bus(&ack)?;
            Ok::<_, crate::executor::ExecError>(encoded.clone())
        })?;
        Ok((seq, encoded))
    })
    .await?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn push(name: &str, version: u64, content: &str) -> ConfigPush {
        ConfigPush {
            name: name.into(),
            version,
            sha256: fleet::config_sha256(content.as_bytes()),
            content: content.as_bytes().to_vec(),
            validate: None,
            reload: None,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn applies_atomically_remembers_across_a_reopen_and_refuses_what_it_must() {
        let tmp = tempfile::tempdir().unwrap();
        let (etc, state) = (tmp.path().join("etc"), tmp.path().join("configs.json"));
        let policy = ExecPolicy::with_commands(["sh"]);
        let configs = Arc::new(Configs::open(Some(etc.clone()), state.clone()).unwrap());
        configs
            .apply(&push("a.conf", 1, "good 1\n"), &policy)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("a.conf")).unwrap(),
            "good 1\n"
        );

        // A failing validate: nothing replaced, no temp file left.
        let validate = |content: &str| ConfigPush {
            validate: Some(vec![
                "sh".into(),
                "-c".into(),
                "grep -q '^good' \"$0\" || { echo not good >&2; exit 3; }".into(),
                FILE_PLACEHOLDER.into(),
            ]),
            ..push("a.conf", 2, content)
        };
        let e = configs
            .apply(&validate("bad\n"), &policy)
            .await
            .unwrap_err();
        assert!(
            e.contains("validate failed") && e.contains("exit 3") && e.contains("not good"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(etc.join("a.conf")).unwrap(),
            "good 1\n"
        );
        assert_eq!(files(&etc), ["a.conf"]);
        configs.apply(&validate("good 2\n"), &policy).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("a.conf")).unwrap(),
            "good 2\n"
        );

        // Refused before anything is written: a hash that does not match, a command off
        // the allowlist, a path for a name.
        let mut tampered = push("b.conf", 1, "x");
        tampered.content = b"y".to_vec();
        assert!(
            configs
                .apply(&tampered, &policy)
                .await
                .unwrap_err()
                .contains("sha256")
        );
        let mut off_list = push("b.conf", 1, "x");
        off_list.reload = Some(vec!["rm".into(), "-rf".into(), "/".into()]);
        assert!(
            configs
                .apply(&off_list, &policy)
                .await
                .unwrap_err()
                .contains("refused")
        );
        assert!(
            configs
                .apply(&push("../b.conf", 1, "x"), &policy)
                .await
                .is_err()
        );
        assert_eq!(files(&etc), ["a.conf"]);
        assert!(!tmp.path().join("b.conf").exists());

        // The state survives a reopen; a local edit shows up as another hash.
        let again = Configs::open(Some(etc.clone()), state).unwrap();
        let report = again.report();
        assert_eq!(report["a.conf"].version, 2);
        assert_eq!(report["a.conf"].sha256, fleet::config_sha256(b"good 2\n"));
        std::fs::write(etc.join("a.conf"), "edited").unwrap();
        assert_eq!(
            again.report()["a.conf"].sha256,
            fleet::config_sha256(b"edited")
        );

        // Without a config_dir nothing can be applied.
        let none = Arc::new(Configs::open(None, tmp.path().join("other.json")).unwrap());
        let e = none
            .apply(&push("a.conf", 1, "x"), &policy)
            .await
            .unwrap_err();
        assert!(e.contains("config_dir"), "{e}");
    }
}
