//! Fleet trust on the control plane's side: the keys it signs with, the agent credentials
//! it issues and renews, the nodes an operator revoked, and the refusals agents report.
//!
//! Two Ed25519 keys with different jobs (see `docs/security.md`):
//! - the **command key** signs every message to an agent ([`messages::command`]); agents
//!   pin its public half, so a bus credential, a gateway or a relay cannot make them act;
//! - the **agent-token key** signs agent tokens (JWT, EdDSA); gateways verify agent
//!   connections against its public half only, so whoever mints app tokens cannot mint an
//!   agent. The scheduler renews each connected agent's token over its live connection
//!   before it expires.
//!
//! Revocations and refusals live in two tables of the scheduler's redb file
//! (`scheduler_revoked`, `scheduler_refusals`), written with the same durability as the
//! rest of the store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use messages::UserId;
use messages::fleet::Refused;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, begin_durable_write, decode, encode};

/// Revoked nodes: node id -> unix ms of the revocation.
const REVOKED: TableDefinition<'_, &str, u64> = TableDefinition::new("scheduler_revoked");
/// Refusals agents reported: (node id, message id) -> [`RefusalRecord`].
const REFUSALS: TableDefinition<'_, (&str, &str), &[u8]> =
    TableDefinition::new("scheduler_refusals");

/// Operator-pinned labels: node id -> msgpack map. Pinned labels override what the agent
/// reports, so targeting by them cannot be steered by a compromised or misconfigured node.
const PINNED: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("scheduler_pinned_labels");

/// Refusals kept per node (the newest; older ones are trimmed).
pub const REFUSALS_PER_NODE: usize = 200;

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM is not an Ed25519 private key.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Issues agent tokens (EdDSA JWTs) with the agent-token key.
pub struct AgentTokens {
    key: EncodingKey,
    /// The public half: the scheduler checks agent credentials itself where no gateway
    /// stands in front of it (artifact downloads).
    public: DecodingKey,
    kid: String,
    /// Lifetime of a renewed token.
    pub ttl: Duration,
}

impl fmt::Debug for AgentTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentTokens")
            .field("kid", &self.kid)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The claims of an agent token.
#[derive(Debug, Serialize, Deserialize)]
struct AgentClaims {
    sub: String,
    kind: String,
    iat: u64,
    exp: u64,
    jti: String,
}

impl AgentTokens {
    /// From a PKCS#8 PEM Ed25519 private key.
    pub fn from_pem(pem: &str, ttl: Duration) -> Result<Self, String> {
        // Parsed once by dalek too, for the key id operators see in logs.
        let signer = messages::command::CommandSigner::from_pem(pem).map_err(|e| e.to_string())?;
        let key = EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let public_pem = signer.public_pem().map_err(|e| e.to_string())?;
        let public = DecodingKey::from_ed_pem(public_pem.as_bytes()).map_err(|e| e.to_string())?;
        Ok(AgentTokens {
            key,
            public,
            kid: signer.kid().to_owned(),
            ttl,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Verifies an agent token as the gateways do: EdDSA with this key's public half,
    /// `exp` and `sub` required (60 s leeway), `kind` absent or `agent`. Returns the node
    /// it names. App tokens (another key) and API keys (not JWTs) are refused.
    pub fn verify(&self, token: &str) -> Result<UserId, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Signature);
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 60;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<PresentedClaims>(token, &self.public, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::Signature,
                _ => TokenError::Malformed,
            })?
            .claims;
        if claims.kind.as_deref().is_some_and(|k| k != "agent") {
            return Err(TokenError::NotAgent);
        }
        UserId::new(claims.sub).map_err(|_| TokenError::Malformed)
    }

    /// A token for `node` valid from `now_s` for `ttl`; returns it with its expiry (unix s).
    pub fn mint(
        &self,
        node: &UserId,
        now_s: u64,
        ttl: Duration,
    ) -> Result<(String, u64), jsonwebtoken::errors::Error> {
        let exp = now_s + ttl.as_secs().max(1);
        let jti: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let claims = AgentClaims {
            sub: node.as_str().to_owned(),
            kind: "agent".to_owned(),
            iat: now_s,
            exp,
            jti,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok((jsonwebtoken::encode(&header, &claims, &self.key)?, exp))
    }
}

/// The claims checked on a presented agent token.
#[derive(Debug, Deserialize)]
struct PresentedClaims {
    sub: String,
    #[serde(default)]
    kind: Option<String>,
}

/// Why a presented agent token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or its claims are unreadable.
    #[error("not a readable agent token")]
    Malformed,
    /// Not signed with the agent-token key.
    #[error("not signed with the agent-token key")]
    Signature,
    /// Expired.
    #[error("expired")]
    Expired,
    /// Signed with the agent-token key but not an agent token.
    #[error("not an agent token")]
    NotAgent,
}

/// Reads a PEM file.
pub fn read_pem(path: &std::path::Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `command.key`, `command.pub`, `agent-token.key` and `agent-token.pub` into
/// `dir` (created if missing; existing files are never overwritten). Private keys are
/// created with mode 0600.
pub fn keygen(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for name in ["command", "agent-token"] {
        let signer = messages::command::CommandSigner::generate();
        let files = [
            (
                format!("{name}.key"),
                signer.to_pem().map_err(|e| e.to_string())?,
                0o600,
            ),
            (
                format!("{name}.pub"),
                signer.public_pem().map_err(|e| e.to_string())?,
                0o644,
            ),
        ];
        for (file, text, mode) in files {
            let path = dir.join(file);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// The in-memory side: which nodes are revoked (loaded from the store, changed with it)
/// and when each connected node's credential was last issued.
#[derive(Debug, Default)]
pub struct Live {
    revoked: Mutex<HashSet<UserId>>,
    issued: Mutex<HashMap<UserId, u64>>,
}

impl Live {
    /// Loads the revoked set.
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        let revoked = store
            .revoked()?
            .into_keys()
            .filter_map(|n| UserId::new(n).ok())
            .collect();
        Ok(Live {
            revoked: Mutex::new(revoked),
            issued: Mutex::default(),
        })
    }

    /// Whether `node` is revoked.
    pub fn is_revoked(&self, node: &UserId) -> bool {
        lock(&self.revoked).contains(node)
    }

    /// Marks `node` revoked or not (after the store changed).
    pub fn set_revoked(&self, node: &UserId, revoked: bool) {
        let mut set = lock(&self.revoked);
        if revoked {
            set.insert(node.clone());
            lock(&self.issued).remove(node);
        } else {
            set.remove(node);
        }
    }

    /// Records that `node` got a credential at `at_s`.
    pub fn issued(&self, node: &UserId, at_s: u64) {
        lock(&self.issued).insert(node.clone(), at_s);
    }

    /// Forgets `node`'s renewal clock (it went offline).
    pub fn forget(&self, node: &UserId) {
        lock(&self.issued).remove(node);
    }

    /// Nodes whose last credential was issued before `before_s`.
    pub fn due(&self, before_s: u64) -> Vec<UserId> {
        lock(&self.issued)
            .iter()
            .filter(|(_, at)| **at < before_s)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A refusal as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalRecord {
    /// The node that refused.
    pub node_id: String,
    /// What it reported.
    pub refused: Refused,
    /// When the scheduler stored it, unix ms.
    pub stored_at_ms: u64,
}

impl Store {
    /// Revokes `node` (idempotent); returns whether it was newly revoked.
    pub fn revoke(&self, node: &UserId, at_ms: u64) -> Result<bool, StoreError> {
        let txn = begin_durable_write(self.db())?;
        let new = {
            let mut table = txn.open_table(REVOKED)?;
            let new = table.get(node.as_str())?.is_none();
            if new {
                table.insert(node.as_str(), at_ms)?;
            }
            new
        };
        if new {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(new)
    }

    /// Lifts a revocation (the node may be enrolled again); returns whether it was revoked.
    pub fn unrevoke(&self, node: &UserId) -> Result<bool, StoreError> {
        let txn = begin_durable_write(self.db())?;
        let was = txn.open_table(REVOKED)?.remove(node.as_str())?.is_some();
        txn.commit()?;
        Ok(was)
    }

    /// Every revoked node with the time of its revocation.
    pub fn revoked(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let txn = self.db().begin_read()?;
        let table = match txn.open_table(REVOKED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = BTreeMap::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.insert(k.value().to_owned(), v.value());
        }
        Ok(out)
    }

    /// Replaces the labels pinned for `node` and applies them to its registry record (if it
    /// has registered): labels pinned before but not now are dropped from the record until
    /// the agent reports them again. Returns the record's labels afterwards.
    pub fn pin_labels(
        &self,
        node: &UserId,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        let old = self.pinned_labels(node)?;
        let bytes = encode(labels, "pinned labels")?;
        let txn = begin_durable_write(self.db())?;
        {
            let mut table = txn.open_table(PINNED)?;
            if labels.is_empty() {
                table.remove(node.as_str())?;
            } else {
                table.insert(node.as_str(), bytes.as_slice())?;
            }
        }
        txn.commit()?;
        let Some(mut record) = self.agent(node)? else {
            return Ok(None);
        };
        for key in old.keys() {
            record.labels.remove(key);
        }
        record
            .labels
            .extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.upsert_agent(&record)?;
        Ok(Some(record.labels))
    }

    /// The labels pinned for `node` (empty when none).
    pub fn pinned_labels(&self, node: &UserId) -> Result<BTreeMap<String, String>, StoreError> {
        let txn = self.db().begin_read()?;
        let table = match txn.open_table(PINNED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e.into()),
        };
        match table.get(node.as_str())? {
            Some(v) => decode(v.value(), "pinned labels"),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Stores a refusal report (idempotent by message id); returns whether it was new.
    pub fn record_refusal(
        &self,
        node: &UserId,
        refused: &Refused,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let record = RefusalRecord {
            node_id: node.as_str().to_owned(),
            refused: refused.clone(),
            stored_at_ms: now_ms,
        };
        let bytes = encode(&record, "refusal")?;
        let txn = begin_durable_write(self.db())?;
        let new = {
            let mut table = txn.open_table(REFUSALS)?;
            let key = (node.as_str(), refused.message_id.as_str());
            let new = table.get(key)?.is_none();
            if new {
                table.insert(key, bytes.as_slice())?;
                // Trim the oldest beyond the bound (message ids sort by outbox sequence
                // within one agent install, near enough for a bound).
                let mut keys = Vec::new();
                for row in table.range((node.as_str(), "")..)? {
                    let (k, _) = row?;
                    let (n, id) = k.value();
                    if n != node.as_str() {
                        break;
                    }
                    keys.push(id.to_owned());
                }
                if keys.len() > REFUSALS_PER_NODE {
                    for id in &keys[..keys.len() - REFUSALS_PER_NODE] {
                        table.remove((node.as_str(), id.as_str()))?;
                    }
                }
            }
            new
        };
        if new {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(new)
    }

    /// The refusals `node` reported, oldest first.
    pub fn refusals(&self, node: &UserId) -> Result<Vec<RefusalRecord>, StoreError> {
        let txn = self.db().begin_read()?;
        let table = match txn.open_table(REFUSALS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.range((node.as_str(), "")..)? {
            let (k, v) = row?;
            if k.value().0 != node.as_str() {
                break;
            }
            out.push(decode::<RefusalRecord>(v.value(), "refusal")?);
        }
        out.sort_by_key(|r| r.refused.at_ms);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(id: &str, at: u64) -> Refused {
        Refused {
            message_id: id.into(),
            route: "agent.task".into(),
            reason: "bad_signature".into(),
            detail: "bad signature".into(),
            command_id: None,
            task_id: Some(7),
            attempt: Some(1),
            at_ms: at,
        }
    }

    #[test]
    fn revocations_and_refusals_are_durable_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let node = UserId::new("edge-1").unwrap();
        {
            let store = Store::open(&path).unwrap();
            assert!(store.revoked().unwrap().is_empty());
            assert!(store.revoke(&node, 5).unwrap());
            assert!(!store.revoke(&node, 6).unwrap());
            assert!(store.record_refusal(&node, &refused("a-1", 1), 10).unwrap());
            assert!(!store.record_refusal(&node, &refused("a-1", 1), 11).unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.revoked().unwrap().get("edge-1"), Some(&5));
        assert_eq!(store.refusals(&node).unwrap().len(), 1);
        assert!(store.unrevoke(&node).unwrap());
        assert!(store.revoked().unwrap().is_empty());
        for i in 0..(REFUSALS_PER_NODE + 5) {
            store
                .record_refusal(&node, &refused(&format!("b-{i:05}"), i as u64), 0)
                .unwrap();
        }
        assert_eq!(store.refusals(&node).unwrap().len(), REFUSALS_PER_NODE);
    }

    #[test]
    fn minted_agent_tokens_carry_the_node_and_expiry() {
        let signer = messages::command::CommandSigner::generate();
        let tokens =
            AgentTokens::from_pem(&signer.to_pem().unwrap(), Duration::from_secs(60)).unwrap();
        let node = UserId::new("edge-1").unwrap();
        let (token, exp) = tokens.mint(&node, 1_000, Duration::from_secs(60)).unwrap();
        assert_eq!(exp, 1_060);
        let key = jsonwebtoken::DecodingKey::from_ed_pem(signer.public_pem().unwrap().as_bytes())
            .unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<AgentClaims>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims.sub, "edge-1");
        assert_eq!(data.claims.kind, "agent");
        assert_eq!(data.header.kid.as_deref(), Some(signer.kid()));
    }
}
