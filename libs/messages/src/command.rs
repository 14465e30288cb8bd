//! Signed commands: the end-to-end envelope every scheduler -> agent message travels in.
//!
//! NATS permissions already keep product services off the agents' channel, but an agent
//! runs commands as root, so it trusts no transport: not the bus, not a gateway, not a
//! relay. The scheduler signs each message with an Ed25519 key whose public half is pinned
//! on every agent (a list, so keys can be rotated), and the agent acts only on a message
//! that verifies and that names it, its route, a lifetime that has not passed, and an id it
//! has not acted on before.
//!
//! On the wire the push body is a MessagePack map [`Signed`] `{kid, envelope, sig}`. The
//! signature covers [`CONTEXT`] followed by the exact `envelope` bytes, which are
//! themselves a MessagePack [`Envelope`] `{v, id, node, route, issued_ms, expires_ms,
//! body}` whose `body` is the typed message ([`crate::fleet::Task`], ...). Signing the
//! bytes rather than a re-encoding means a verifier in any language checks what it
//! received, with no canonical form to agree on. The gateway never looks inside.
//!
//! Key ids are derived, not chosen: the first 16 hex digits of SHA-256 over the 32-byte
//! public key ([`key_id`]), so an operator can tell which key signed what and a verifier
//! can find the key without trying each.

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::payload::{self, PayloadError};

/// Domain separation: a signature over a command can never be valid for anything else
/// signed with the same key.
pub const CONTEXT: &[u8] = b"rt-fleet-command/v1\0";

/// Envelope format version.
pub const VERSION: u8 = 1;

/// Longest lifetime a verifier accepts: ids must be remembered until their command
/// expires, so an unbounded lifetime would mean unbounded memory.
pub const MAX_LIFETIME_MS: u64 = 24 * 60 * 60 * 1000;

/// Clock skew a verifier tolerates between scheduler and agent.
pub const LEEWAY_MS: u64 = 60 * 1000;

/// What travels as the push body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// Id of the signing key ([`key_id`]).
    pub kid: String,
    /// MessagePack [`Envelope`]; the signed bytes (after [`CONTEXT`]).
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// Ed25519 signature, 64 bytes.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// What the signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`VERSION`].
    pub v: u8,
    /// Unique per command (128 random bits, hex): what replay protection remembers.
    pub id: String,
    /// The one node that may act on it.
    pub node: String,
    /// The route it must arrive on (`agent.task`, ...): a signed cancel cannot be replayed
    /// as something else.
    pub route: String,
    /// Unix ms when signed.
    pub issued_ms: u64,
    /// Unix ms after which it must not be acted on.
    pub expires_ms: u64,
    /// The typed message (MessagePack).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Why a command was refused. The snake-case name ([`Refusal::as_str`]) is what agents
/// report and what metrics are labelled with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a [`Signed`] map (an unsigned or garbled message).
    #[error("not a signed command: {0}")]
    Unsigned(String),
    /// The key id names no pinned key.
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The envelope does not decode or has an unknown version.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// Signed for another node.
    #[error("signed for node {0:?}, not this one")]
    OtherNode(String),
    /// Signed for another route.
    #[error("signed for route {0:?}, arrived on another")]
    OtherRoute(String),
    /// Its lifetime has passed.
    #[error("expired {0} ms ago")]
    Expired(u64),
    /// Lifetime longer than [`MAX_LIFETIME_MS`], or issued in the future.
    #[error("lifetime out of bounds")]
    Lifetime,
    /// Already acted on.
    #[error("replayed command {0}")]
    Replayed(String),
    /// Verified, but its body is not the message its route names.
    #[error("undecodable body: {0}")]
    Body(String),
}

impl Refusal {
    /// Every reason's name, for metrics.
    pub const NAMES: [&'static str; 10] = [
        "unsigned",
        "unknown_key",
        "bad_signature",
        "malformed",
        "other_node",
        "other_route",
        "expired",
        "lifetime",
        "replayed",
        "body",
    ];

    /// Snake-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::Unsigned(_) => "unsigned",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::Malformed(_) => "malformed",
            Refusal::OtherNode(_) => "other_node",
            Refusal::OtherRoute(_) => "other_route",
            Refusal::Expired(_) => "expired",
            Refusal::Lifetime => "lifetime",
            Refusal::Replayed(_) => "replayed",
            Refusal::Body(_) => "body",
        }
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not a PKCS#8 Ed25519 private key in PEM.
    #[error("not an Ed25519 private key (PKCS#8 PEM): {0}")]
    Private(String),
    /// Not an SPKI Ed25519 public key in PEM.
    #[error("not an Ed25519 public key (SPKI PEM): {0}")]
    Public(String),
    /// A public-key file held no key.
    #[error("no public key in the file")]
    Empty,
}

/// The id of a public key: 16 hex digits of SHA-256 over its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The scheduler's half: signs envelopes.
pub struct CommandSigner {
    key: SigningKey,
    kid: String,
}

impl fmt::Debug for CommandSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("CommandSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl CommandSigner {
    /// From a PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519` writes one).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let key =
            SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| KeyError::Private(e.to_string()))?;
        Ok(Self::from_key(key))
    }

    /// From a raw signing key.
    pub fn from_key(key: SigningKey) -> Self {
        let kid = key_id(&key.verifying_key());
        CommandSigner { key, kid }
    }

    /// A fresh random key (tests, key generation).
    pub fn generate() -> Self {
        Self::from_key(SigningKey::from_bytes(&rand_bytes()))
    }

    /// This key's id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The private key as PKCS#8 PEM (key generation).
    pub fn to_pem(&self) -> Result<String, KeyError> {
        self.key
            .to_pkcs8_pem(Default::default())
            .map(|z| z.to_string())
            .map_err(|e| KeyError::Private(e.to_string()))
    }

    /// The public key as SPKI PEM (what agents pin).
    pub fn public_pem(&self) -> Result<String, KeyError> {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| KeyError::Public(e.to_string()))
    }

    /// Signs `body` for `node` on `route`, valid from `now_ms` for `lifetime_ms`, and
    /// returns the push body and the command id.
    pub fn sign(
        &self,
        node: &str,
        route: &str,
        body: Vec<u8>,
        now_ms: u64,
        lifetime_ms: u64,
    ) -> Result<(Vec<u8>, String), PayloadError> {
        let id: String = rand_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let envelope = Envelope {
            v: VERSION,
            id: id.clone(),
            node: node.to_owned(),
            route: route.to_owned(),
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(lifetime_ms),
            body,
        };
        Ok((self.sign_envelope(&envelope)?, id))
    }

    /// The push body for an envelope built by the caller (test vectors, tools).
    pub fn sign_envelope(&self, envelope: &Envelope) -> Result<Vec<u8>, PayloadError> {
        let envelope = payload::to_bus(envelope)?;
        let sig = self.key.sign(&signed_bytes(&envelope)).to_bytes().to_vec();
        let signed = Signed {
            kid: self.kid.clone(),
            envelope,
            sig,
        };
        payload::to_bus(&signed)
    }
}

fn signed_bytes(envelope: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CONTEXT.len() + envelope.len());
    bytes.extend_from_slice(CONTEXT);
    bytes.extend_from_slice(envelope);
    bytes
}

fn rand_bytes() -> [u8; 32] {
    rand::random()
}

/// The agent's half: the pinned public keys, by id.
#[derive(Clone, Default)]
pub struct CommandVerifier {
    keys: HashMap<String, VerifyingKey>,
}

impl fmt::Debug for CommandVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("CommandVerifier")
            .field("kids", &kids)
            .finish()
    }
}

impl PartialEq for CommandVerifier {
    fn eq(&self, other: &Self) -> bool {
        self.keys == other.keys
    }
}

impl CommandVerifier {
    /// Pins the given keys.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        CommandVerifier {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    /// Every SPKI PEM public key in `text` (one file may hold the current and the next key).
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let keys = public_key_blocks(text)
            .map(|block| {
                block.and_then(|b| {
                    VerifyingKey::from_public_key_pem(b)
                        .map_err(|e| KeyError::Public(e.to_string()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self::new(keys))
    }

    /// Ids of the pinned keys, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.keys.keys().cloned().collect();
        kids.sort();
        kids
    }

    /// Whether no key is pinned (then nothing verifies).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks signature, node, route and lifetime (not replay: the caller remembers ids,
    /// durably, and must check [`Envelope::id`] before acting).
    pub fn verify(
        &self,
        push_body: &[u8],
        node: &str,
        route: &str,
        now_ms: u64,
    ) -> Result<Envelope, Refusal> {
        let signed: Signed =
            payload::from_bus(push_body).map_err(|e| Refusal::Unsigned(e.to_string()))?;
        let key = self
            .keys
            .get(&signed.kid)
            .ok_or_else(|| Refusal::UnknownKey(signed.kid.clone()))?;
        let sig = Signature::from_slice(&signed.sig).map_err(|_| Refusal::BadSignature)?;
        key.verify(&signed_bytes(&signed.envelope), &sig)
            .map_err(|_| Refusal::BadSignature)?;
        let envelope: Envelope =
            payload::from_bus(&signed.envelope).map_err(|e| Refusal::Malformed(e.to_string()))?;
        if envelope.v != VERSION {
            return Err(Refusal::Malformed(format!("version {}", envelope.v)));
        }
        if envelope.node != node {
            return Err(Refusal::OtherNode(envelope.node));
        }
        if envelope.route != route {
            return Err(Refusal::OtherRoute(envelope.route));
        }
        if envelope.expires_ms < envelope.issued_ms
            || envelope.expires_ms - envelope.issued_ms > MAX_LIFETIME_MS
            || envelope.issued_ms > now_ms.saturating_add(LEEWAY_MS)
        {
            return Err(Refusal::Lifetime);
        }
        if envelope.expires_ms.saturating_add(LEEWAY_MS) < now_ms {
            return Err(Refusal::Expired(now_ms - envelope.expires_ms));
        }
        Ok(envelope)
    }
}

/// The `PUBLIC KEY` PEM blocks in `text`, each with its armour, in order: a key file may
/// hold several keys (rotation). An unterminated block is an error.
pub fn public_key_blocks(text: &str) -> impl Iterator<Item = Result<&str, KeyError>> {
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = rest.find(BEGIN)?;
        let after = &rest[start..];
        let Some(end) = after.find(END) else {
            rest = "";
            return Some(Err(KeyError::Public("unterminated PEM block".into())));
        };
        rest = &after[end + END.len()..];
        Some(Ok(&after[..end + END.len()]))
    })
}

/// Peeks at an envelope without verifying it: only to say in a refusal report what a
/// refused command claimed to be. Never act on it.
pub fn peek(push_body: &[u8]) -> Option<Envelope> {
    let signed: Signed = payload::from_bus(push_body).ok()?;
    payload::from_bus(&signed.envelope).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn signed(signer: &CommandSigner, node: &str, route: &str, lifetime: u64) -> Vec<u8> {
        signer
            .sign(node, route, b"body".to_vec(), NOW, lifetime)
            .unwrap()
            .0
    }

    #[test]
    fn a_signed_command_verifies_for_its_node_route_and_lifetime() {
        let signer = CommandSigner::generate();
        let verifier = CommandVerifier::new([signer.verifying_key()]);
        let body = signed(&signer, "edge-1", "agent.task", 60_000);
        let env = verifier.verify(&body, "edge-1", "agent.task", NOW).unwrap();
        assert_eq!(env.body, b"body");
        assert_eq!(env.id.len(), 32);
        assert_eq!(
            verifier.verify(&body, "edge-2", "agent.task", NOW),
            Err(Refusal::OtherNode("edge-1".into()))
        );
        assert_eq!(
            verifier.verify(&body, "edge-1", "agent.cancel", NOW),
            Err(Refusal::OtherRoute("agent.task".into()))
        );
        assert!(matches!(
            verifier.verify(&body, "edge-1", "agent.task", NOW + 60_000 + LEEWAY_MS + 1),
            Err(Refusal::Expired(_))
        ));
        let long = signed(&signer, "edge-1", "agent.task", MAX_LIFETIME_MS + 1);
        assert_eq!(
            verifier.verify(&long, "edge-1", "agent.task", NOW),
            Err(Refusal::Lifetime)
        );
    }

    #[test]
    fn tampering_unknown_keys_and_unsigned_bodies_are_refused() {
        let signer = CommandSigner::generate();
        let other = CommandSigner::generate();
        let verifier = CommandVerifier::new([signer.verifying_key()]);
        let body = signed(&signer, "edge-1", "agent.task", 60_000);

        let mut s: Signed = payload::from_bus(&body).unwrap();
        let mut env: Envelope = payload::from_bus(&s.envelope).unwrap();
        env.node = "edge-2".into();
        s.envelope = payload::to_bus(&env).unwrap();
        let forged = payload::to_bus(&s).unwrap();
        assert_eq!(
            verifier.verify(&forged, "edge-2", "agent.task", NOW),
            Err(Refusal::BadSignature)
        );

        let foreign = signed(&other, "edge-1", "agent.task", 60_000);
        assert!(matches!(
            verifier.verify(&foreign, "edge-1", "agent.task", NOW),
            Err(Refusal::UnknownKey(_))
        ));
        // The right kid with another key's signature.
        let mut s: Signed = payload::from_bus(&foreign).unwrap();
        s.kid = signer.kid().to_owned();
        let relabelled = payload::to_bus(&s).unwrap();
        assert_eq!(
            verifier.verify(&relabelled, "edge-1", "agent.task", NOW),
            Err(Refusal::BadSignature)
        );
        assert!(matches!(
            verifier.verify(b"\x80", "edge-1", "agent.task", NOW),
            Err(Refusal::Unsigned(_))
        ));
        assert!(matches!(
            verifier.verify(&[], "edge-1", "agent.task", NOW),
            Err(Refusal::Unsigned(_))
        ));
    }

    #[test]
    fn keys_round_trip_through_pem_and_a_file_may_pin_several() {
        let a = CommandSigner::generate();
        let b = CommandSigner::generate();
        let again = CommandSigner::from_pem(&a.to_pem().unwrap()).unwrap();
        assert_eq!(again.kid(), a.kid());
        let file = format!("{}\n{}", a.public_pem().unwrap(), b.public_pem().unwrap());
        let verifier = CommandVerifier::from_pem(&file).unwrap();
        assert_eq!(verifier.kids().len(), 2);
        for signer in [&a, &b] {
            let body = signed(signer, "n", "agent.task", 1000);
            assert!(verifier.verify(&body, "n", "agent.task", NOW).is_ok());
        }
        assert!(matches!(
            CommandVerifier::from_pem("nothing"),
            Err(KeyError::Empty)
        ));
        assert!(CommandSigner::from_pem("garbage").is_err());
    }

    /// The test vector of docs/protocol.md (14.2): RFC 8032's first test key signs a fixed
    /// envelope; the document must show exactly these bytes.
    #[test]
    fn the_protocol_documents_test_vector_holds() {
        let secret: [u8; 32] =
            hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .try_into()
                .unwrap();
        let signer = CommandSigner::from_key(SigningKey::from_bytes(&secret));
        let envelope = Envelope {
            v: 1,
            id: "000102030405060708090a0b0c0d0e0f".into(),
            node: "edge-1".into(),
            route: "agent.cancel".into(),
            issued_ms: 1_800_000_000_000,
            expires_ms: 1_800_000_600_000,
            // fleet::Cancel {task_id: 42}
            body: vec![0x81, 0xa7, b't', b'a', b's', b'k', b'_', b'i', b'd', 0x2a],
        };
        let body = signer.sign_envelope(&envelope).unwrap();
        let verifier = CommandVerifier::new([signer.verifying_key()]);
        let got = verifier
            .verify(&body, "edge-1", "agent.cancel", 1_800_000_000_000)
            .unwrap();
        assert_eq!(got, envelope);
        let text: String = body.iter().map(|b| format!("{b:02x} ")).collect();
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/protocol.md"
        ))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
        assert!(
            doc.contains(text.trim()),
            "docs/protocol.md 14.2 must show the signed command:\n{}\nkid {}",
            text.trim(),
            signer.kid()
        );
        assert!(doc.contains(signer.kid()), "kid {}", signer.kid());
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn peek_reads_a_claim_without_trusting_it() {
        let signer = CommandSigner::generate();
        let body = signed(&signer, "edge-9", "agent.cancel", 1000);
        assert_eq!(peek(&body).unwrap().node, "edge-9");
        assert!(peek(b"junk").is_none());
    }
}
