//! The agent's side of fleet trust: which credential it connects with, and whether a
//! message from the control plane may be acted on.
//!
//! Credentials: the operator enrols a node with an agent token (`token` or `token_file`);
//! from then on the scheduler renews it over the live connection. The newest renewed token
//! is written atomically to `credential_path` (temp file, fsync, rename, fsync of the
//! directory), so a restart does not fall back to an enrolment token that has expired. At
//! every connect the agent uses whichever candidate (renewed, token file re-read, inline
//! token) expires last and is still valid; expiry is read from the token's claims without
//! verifying it, because the gateway verifies and the agent only has to pick.
//!
//! Commands: every push is a signed envelope ([`messages::command`]). [`Gate::admit`]
//! verifies the signature against the pinned keys, checks node, route and lifetime, and for
//! routes that make the agent act remembers the command id durably in the outbox file
//! before the caller acts, so a replay is refused even after a restart. A refusal becomes an
//! outboxed [`Refused`] report.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use messages::command::{CommandVerifier, Envelope, Refusal};
use messages::fleet::{self, Refused};

use crate::config::Token;
use crate::outbox::{Outbox, OutboxError};

/// Outbox entry kind of a refusal report (a msgpack [`Refused`]).
pub(crate) const REFUSED_KIND: &str = "refused";

/// Why a renewed credential could not be taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialError {
    /// The token's claims do not decode.
    #[error("the renewed token is not a readable JWT")]
    Unreadable,
    /// Issued for another node.
    #[error("the renewed token names node {0:?}")]
    OtherNode(String),
    /// Writing it failed.
    #[error("cannot store the credential at {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The claims the agent reads from its own tokens (unverified: only to choose).
#[derive(Debug, serde::Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
}

fn claims(token: &str) -> Option<Claims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The expiry (unix s) a token claims, if readable.
pub(crate) fn expiry(token: &str) -> Option<u64> {
    claims(token)?.exp
}

/// The credentials the agent can connect with.
#[derive(Debug)]
pub(crate) struct Credentials {
    node: String,
    enrolment: Token,
    token_file: Option<PathBuf>,
    path: PathBuf,
    renewed: Mutex<Option<Token>>,
}

impl Credentials {
    /// From the configuration; reads a renewed credential left by an earlier run.
    pub(crate) fn new(
        node: &str,
        enrolment: Token,
        token_file: Option<PathBuf>,
        path: PathBuf,
    ) -> Self {
        let renewed = std::fs::read_to_string(&path)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(Token::new);
        Credentials {
            node: node.to_owned(),
            enrolment,
            token_file,
            path,
            renewed: Mutex::new(renewed),
        }
    }

    /// The token to connect with now: the valid one that expires last (a token whose
    /// expiry cannot be read counts as expiring never, as before renewal existed).
    pub(crate) fn current(&self, now_s: u64) -> Token {
        let mut candidates = Vec::new();
        if let Some(t) = lock(&self.renewed).clone() {
            candidates.push(t);
        }
        // Re-read: an operator may have dropped in a new enrolment token.
        if let Some(t) = self
            .token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
        {
            candidates.push(Token::new(t));
        }
        candidates.push(self.enrolment.clone());
        let exp = |t: &Token| expiry(t.expose()).unwrap_or(u64::MAX);
        let valid = candidates
            .iter()
            .filter(|t| exp(t) > now_s)
            .max_by_key(|t| exp(t));
        // Nothing valid: offer the newest anyway; the gateway says why it refuses.
        valid
            .or_else(|| candidates.iter().max_by_key(|t| exp(t)))
            .cloned()
            .unwrap_or_else(|| self.enrolment.clone())
    }

    /// Takes a renewed token: checks it names this node, stores it durably, uses it from
    /// the next connect on. Blocking (fsync).
    pub(crate) fn renew(&self, token: &str) -> Result<u64, CredentialError> {
        let c = claims(token).ok_or(CredentialError::Unreadable)?;
        match c.sub {
            Some(sub) if sub == self.node => {}
            other => return Err(CredentialError::OtherNode(other.unwrap_or_default())),
        }
        write_atomically(&self.path, token.as_bytes()).map_err(|source| {
            CredentialError::Write {
                path: self.path.clone(),
                source,
            }
        })?;
        *lock(&self.renewed) = Some(Token::new(token.to_owned()));
        Ok(c.exp.unwrap_or(0))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Temp file in the same directory, fsync, rename over, fsync the directory: a crash
/// leaves the old file or the new one, never a torn one. Owner-only permissions.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Routes whose commands make the agent act: their ids are remembered durably.
fn acts(route: &str) -> bool {
    matches!(
        route,
        fleet::down::TASK
            | fleet::down::CANCEL
            | fleet::down::CONFIG
            | fleet::down::UPGRADE
            // A replayed open would dial again with a token its replayer knows.
            | messages::tunnel::OPEN
    )
}

/// Why a push was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Refused; report it.
    #[error("{0}")]
    Refused(Refusal),
    /// The replay set could not be written: do not act, do not report (try again later).
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Decides whether a push may be acted on: the agent's only way from a push to an action,
/// public so the fuzz target (`fuzz/fuzz_targets/agent_commands.rs`) drives the real one.
#[derive(Debug)]
pub struct Gate {
    node: String,
    keys: CommandVerifier,
}

impl Gate {
    /// For `node` with the pinned `keys`.
    pub fn new(node: &str, keys: CommandVerifier) -> Self {
        Gate {
            node: node.to_owned(),
            keys,
        }
    }

    /// Verifies `body` as a command for this node on `route`; for acting routes, records
    /// its id in `outbox` first. Blocking (fsync) for acting routes.
    pub fn admit(
        &self,
        outbox: &Outbox,
        route: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Envelope, GateError> {
        let envelope = self
            .keys
            .verify(body, &self.node, route, now_ms)
            .map_err(GateError::Refused)?;
        if acts(route) {
            let prune = now_ms.saturating_sub(messages::command::LEEWAY_MS);
            if !outbox.remember_command(&envelope.id, envelope.expires_ms, prune)? {
                return Err(GateError::Refused(Refusal::Replayed(envelope.id)));
            }
        }
        Ok(envelope)
    }
}

/// The refusal report for a push, with what the (unverified) envelope claimed.
pub(crate) fn refusal_report(route: &str, body: &[u8], refusal: &Refusal, now_ms: u64) -> Refused {
    let claimed = messages::command::peek(body);
    let (task_id, attempt) = claimed
        .as_ref()
        .and_then(|e| match route {
            fleet::down::TASK => messages::payload::from_bus::<fleet::Task>(&e.body)
                .ok()
                .map(|t| (Some(t.task_id), Some(t.attempt))),
            fleet::down::CANCEL => messages::payload::from_bus::<fleet::Cancel>(&e.body)
                .ok()
                .map(|c| (Some(c.task_id), None)),
            _ => None,
        })
        .unwrap_or((None, None));
    Refused {
        // Filled in from the outbox sequence by the caller.
        message_id: String::new(),
        route: route.to_owned(),
        reason: refusal.as_str().to_owned(),
        detail: refusal.to_string(),
        command_id: claimed.map(|e| e.id),
        task_id,
        attempt,
        at_ms: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"EdDSA"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn the_valid_credential_that_expires_last_wins_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential.jwt");
        let token_file = dir.path().join("token");
        let enrol = jwt(&serde_json::json!({"sub": "edge-1", "exp": 1_000}));
        std::fs::write(&token_file, &enrol).unwrap();
        let creds = Credentials::new(
            "edge-1",
            Token::new(enrol.clone()),
            Some(token_file.clone()),
            path.clone(),
        );
        assert_eq!(creds.current(500).expose(), enrol);
        let renewed = jwt(&serde_json::json!({"sub": "edge-1", "exp": 2_000}));
        assert_eq!(creds.renew(&renewed).unwrap(), 2_000);
        assert_eq!(creds.current(500).expose(), renewed);
        // The operator drops a longer-lived token into the file: re-read at connect.
        let newer = jwt(&serde_json::json!({"sub": "edge-1", "exp": 3_000}));
        std::fs::write(&token_file, &newer).unwrap();
        assert_eq!(creds.current(500).expose(), newer);
        std::fs::write(&token_file, &enrol).unwrap();
        // A restart picks the renewed one up from disk.
        let again = Credentials::new("edge-1", Token::new(enrol.clone()), None, path.clone());
        assert_eq!(again.current(1_500).expose(), renewed);
        // Another node's token is refused and changes nothing.
        let other = jwt(&serde_json::json!({"sub": "edge-2", "exp": 9_000}));
        assert!(matches!(
            creds.renew(&other),
            Err(CredentialError::OtherNode(_))
        ));
        assert!(matches!(
            creds.renew("garbage"),
            Err(CredentialError::Unreadable)
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), renewed);
    }

    #[test]
    fn replays_are_refused_across_reopening_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let signer = messages::command::CommandSigner::generate();
        let gate = Gate::new("edge-1", CommandVerifier::new([signer.verifying_key()]));
        let now = 1_800_000_000_000;
        let (body, _) = signer
            .sign("edge-1", fleet::down::TASK, b"x".to_vec(), now, 60_000)
            .unwrap();
        {
            let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
            assert!(gate.admit(&outbox, fleet::down::TASK, &body, now).is_ok());
            assert!(matches!(
                gate.admit(&outbox, fleet::down::TASK, &body, now),
                Err(GateError::Refused(Refusal::Replayed(_)))
            ));
        }
        let outbox = Outbox::open(dir.path().join("o.redb")).unwrap();
        assert!(matches!(
            gate.admit(&outbox, fleet::down::TASK, &body, now + 1),
            Err(GateError::Refused(Refusal::Replayed(_)))
        ));
        // Acks are idempotent: not remembered, so a repeat is fine.
        let (ack, _) = signer
            .sign("edge-1", fleet::down::ACK, b"a".to_vec(), now, 60_000)
            .unwrap();
        assert!(gate.admit(&outbox, fleet::down::ACK, &ack, now).is_ok());
        assert!(gate.admit(&outbox, fleet::down::ACK, &ack, now).is_ok());
        let report = refusal_report(
            fleet::down::TASK,
            &body,
            &Refusal::Replayed("x".into()),
            now,
        );
        assert_eq!(report.reason, "replayed");
        assert_eq!(report.command_id.as_deref().map(str::len), Some(32));
    }
}
