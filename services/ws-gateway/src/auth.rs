//! Authentication of WebSocket upgrades: verifies a signed JWT (HS256 with a shared
//! secret, or EdDSA with an Ed25519 public key) and turns its claims into the identity the
//! gateway stamps on everything the connection does.
//!
//! Agent tokens are a separate trust domain: they verify only against the agent-token
//! public keys (EdDSA, issued by the scheduler), never against the app keys, so whoever
//! can mint app tokens (a product's identity provider, anyone with the HS256 secret) cannot
//! mint an agent identity; and a token signed with an agent-token key is always an agent.
//!
//! The token comes from `Authorization: Bearer <jwt>` or, because browsers cannot set
//! headers on a WebSocket, from the `token` query parameter. Verification happens before
//! the upgrade: a bad token gets a 401 and never a socket.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use messages::{ClientKind, RoomId, UserId};
use serde::Deserialize;

/// The keys a gateway accepts tokens from. At least one must be configured.
#[derive(Clone, Default)]
pub struct Keys {
    hs256: Option<DecodingKey>,
    eddsa: Option<DecodingKey>,
    /// Agent-token public keys (several while a key is rotated).
    agent: Vec<DecodingKey>,
    /// Allowed clock skew for `exp` and `nbf`, seconds.
    leeway_secs: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys")
            .field("hs256", &self.hs256.is_some())
            .field("eddsa", &self.eddsa.is_some())
            .field("agent_keys", &self.agent.len())
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

/// Why keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither a secret nor a public key was given.
    #[error("no token keys configured: set an HS256 secret and/or an Ed25519 public key")]
    NoKeys,
    /// The HS256 secret is too short to be a secret.
    #[error("HS256 secret must be at least 32 bytes")]
    WeakSecret,
    /// The PEM did not parse as an Ed25519 public key.
    #[error("Ed25519 public key: {0}")]
    BadPublicKey(jsonwebtoken::errors::Error),
    /// The agent-token key file held no PEM public key.
    #[error("no PEM public key in the agent-token key file")]
    NoAgentKey,
}

impl Keys {
    /// Builds the key set from an HS256 secret and/or an Ed25519 public key in PEM.
    pub fn new(
        hs256_secret: Option<&[u8]>,
        ed25519_public_pem: Option<&[u8]>,
        leeway_secs: u64,
    ) -> Result<Self, KeyError> {
        let hs256 = match hs256_secret {
            Some(secret) if secret.len() < 32 => return Err(KeyError::WeakSecret),
            Some(secret) => Some(DecodingKey::from_secret(secret)),
            None => None,
        };
        let eddsa = ed25519_public_pem
            .map(DecodingKey::from_ed_pem)
            .transpose()
            .map_err(KeyError::BadPublicKey)?;
        if hs256.is_none() && eddsa.is_none() {
            return Err(KeyError::NoKeys);
        }
        Ok(Keys {
            hs256,
            eddsa,
            agent: Vec::new(),
            leeway_secs,
        })
    }

    /// Adds the agent-token public keys: every `PUBLIC KEY` PEM block in `pem` (Ed25519
    /// SPKI). Without them no agent can connect.
    pub fn with_agent_keys(mut self, pem: &[u8]) -> Result<Self, KeyError> {
        let text = String::from_utf8_lossy(pem);
        for block in messages::command::public_key_blocks(&text) {
            // An unterminated block is no key; the emptiness check below reports it.
            let Ok(block) = block else { break };
            self.agent
                .push(DecodingKey::from_ed_pem(block.as_bytes()).map_err(KeyError::BadPublicKey)?);
        }
        if self.agent.is_empty() {
            return Err(KeyError::NoAgentKey);
        }
        Ok(self)
    }

    /// Whether agent tokens can be verified.
    pub fn accepts_agents(&self) -> bool {
        !self.agent.is_empty()
    }
}

/// Why a token was refused. Each is a 401 with this text in the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the header or the query.
    #[error("missing token")]
    Missing,
    /// Not three base64url parts, or undecodable header/claims.
    #[error("malformed token")]
    Malformed,
    /// Signed with an algorithm no configured key accepts.
    #[error("token algorithm not accepted")]
    Algorithm,
    /// Signature does not verify.
    #[error("bad signature")]
    Signature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// A required claim is missing or has the wrong shape.
    #[error("invalid claims: {0}")]
    Claims(String),
}

/// The claims this gateway reads. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    rooms: Vec<String>,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// From `sub`.
    pub user_id: UserId,
    /// From `kind` (`app` by default, or `agent`).
    pub kind: ClientKind,
    /// From `rooms`: rooms the client may join (ws-api decides; the gateway only forwards).
    pub allowed_rooms: Vec<RoomId>,
    /// Unix seconds when the token expires.
    pub expires_at: u64,
}

/// Verifies `token` against `keys`. `exp` is required.
///
/// An EdDSA token is tried against the agent-token keys first: if one verifies it, the
/// token is an agent's (a `kind` other than `agent` is refused). Otherwise the app keys
/// decide, and an app-signed token claiming `kind: agent` is refused.
pub fn verify(token: &str, keys: &Keys) -> Result<Identity, AuthError> {
    let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
    if header.alg == Algorithm::EdDSA {
        for key in &keys.agent {
            match decode_claims(token, key, header.alg, keys.leeway_secs) {
                Ok(claims) => return identity(claims, Signer::Agent),
                Err(AuthError::Signature) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let key = match header.alg {
        Algorithm::HS256 => keys.hs256.as_ref(),
        Algorithm::EdDSA => keys.eddsa.as_ref(),
        _ => None,
    };
    let key = match key {
        Some(key) => key,
        // An EdDSA token that no agent key verified and no app key exists for.
        None if header.alg == Algorithm::EdDSA && !keys.agent.is_empty() => {
            return Err(AuthError::Signature);
        }
        None => return Err(AuthError::Algorithm),
    };
    let claims = decode_claims(token, key, header.alg, keys.leeway_secs)?;
    identity(claims, Signer::App)
}

/// Which trust domain verified a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signer {
    App,
    Agent,
}

fn decode_claims(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
    leeway_secs: u64,
) -> Result<serde_json::Value, AuthError> {
    let mut validation = Validation::new(alg);
    validation.leeway = leeway_secs;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "sub"]);
    decode::<serde_json::Value>(token, key, &validation)
        .map(|data| data.claims)
        .map_err(|e| map_error(&e))
}

fn identity(claims: serde_json::Value, signer: Signer) -> Result<Identity, AuthError> {
    let expires_at = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let claims: Claims =
        serde_json::from_value(claims).map_err(|e| AuthError::Claims(e.to_string()))?;
    let user_id = UserId::new(claims.sub).map_err(|e| AuthError::Claims(format!("sub: {e}")))?;
    let kind = match (claims.kind.as_deref(), signer) {
        (None, Signer::App) => ClientKind::App,
        (None, Signer::Agent) => ClientKind::Agent,
        (Some(kind), _) => kind
            .parse()
            .map_err(|e| AuthError::Claims(format!("kind: {e}")))?,
    };
    match (kind, signer) {
        (ClientKind::Agent, Signer::App) => {
            return Err(AuthError::Claims(
                "agent tokens must be signed with the agent-token key".into(),
            ));
        }
        (ClientKind::App, Signer::Agent) => {
            return Err(AuthError::Claims(
                "a token signed with the agent-token key must be an agent token".into(),
            ));
        }
        _ => {}
    }
    let allowed_rooms = match kind {
        // Agents never join rooms.
        ClientKind::Agent => Vec::new(),
        ClientKind::App => claims
            .rooms
            .into_iter()
            .map(RoomId::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthError::Claims(format!("rooms: {e}")))?,
    };
    Ok(Identity {
        user_id,
        kind,
        allowed_rooms,
        expires_at,
    })
}

fn map_error(err: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::Claims(format!("missing {claim}")),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        _ => AuthError::Claims(err.to_string()),
    }
}

/// Signs an HS256 token for development and testing (`ws-gateway --mint-token`): the same
/// claims a production identity provider would issue.
pub fn mint(
    secret: &[u8],
    user: &UserId,
    kind: ClientKind,
    rooms: &[RoomId],
    ttl: std::time::Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = servicekit::clock::now_secs();
    let claims = serde_json::json!({
        "sub": user.as_str(),
        "kind": kind.as_str(),
        "rooms": rooms.iter().map(RoomId::as_str).collect::<Vec<_>>(),
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
}

/// Extracts the token from an `Authorization` header value or a query string.
pub fn token_from(authorization: Option<&str>, query: &str) -> Option<String> {
    if let Some(value) = authorization {
        let value = value.trim();
        if let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        {
            let token = token.trim();
            if !token.is_empty() {
                return Some(token.to_owned());
            }
        }
    }
    servicekit::query::first(query, "token")
}

#[cfg(test)]
pub(crate) mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    pub(crate) const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
    const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIDUxqBHnGvBXd7hD+MXbc5tQAWsrMbCDVl+777LAG2aX\n-----END PRIVATE KEY-----\n";
    const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEABLam019SgZRosv2XBBlxWfdszHfUpiPWURyHTK0p5eI=\n-----END PUBLIC KEY-----\n";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn keys() -> Keys {
        Keys::new(Some(SECRET), Some(ED_PUBLIC.as_bytes()), 0).unwrap()
    }

    fn hs(claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn ed(claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
        encode(&Header::new(Algorithm::EdDSA), claims, &key).unwrap()
    }

    #[test]
    fn accepts_hs256_and_eddsa() {
        let exp = now() + 60;
        let id = verify(
            &hs(&json!({"sub": "alice", "exp": exp, "rooms": ["lobby"]})),
            &keys(),
        )
        .unwrap();
        assert_eq!(id.user_id.as_str(), "alice");
        assert_eq!(id.kind, ClientKind::App);
        assert_eq!(id.allowed_rooms, vec![RoomId::new("lobby").unwrap()]);
        assert_eq!(id.expires_at, exp);
        let id = verify(&ed(&json!({"sub": "bob", "exp": exp})), &keys()).unwrap();
        assert_eq!(id.kind, ClientKind::App);
    }

    #[test]
    fn agent_tokens_verify_only_against_the_agent_keys() {
        let exp = now() + 60;
        let agent_key = messages::command::CommandSigner::generate();
        let next_key = messages::command::CommandSigner::generate();
        let pem = format!(
            "{}{}",
            agent_key.public_pem().unwrap(),
            next_key.public_pem().unwrap()
        );
        let k = keys().with_agent_keys(pem.as_bytes()).unwrap();
        let sign = |signer: &messages::command::CommandSigner, claims: &serde_json::Value| {
            let key = EncodingKey::from_ed_pem(signer.to_pem().unwrap().as_bytes()).unwrap();
            encode(&Header::new(Algorithm::EdDSA), claims, &key).unwrap()
        };
        // Either pinned key (rotation); `kind` may be left out.
        for signer in [&agent_key, &next_key] {
            let id = verify(&sign(signer, &json!({"sub": "edge-1", "exp": exp})), &k).unwrap();
            assert_eq!(id.kind, ClientKind::Agent);
            assert_eq!(id.user_id.as_str(), "edge-1");
        }
        // Whoever holds an app key cannot mint an agent.
        for forged in [
            hs(&json!({"sub": "edge-1", "exp": exp, "kind": "agent"})),
            ed(&json!({"sub": "edge-1", "exp": exp, "kind": "agent"})),
        ] {
            assert!(
                matches!(verify(&forged, &k), Err(AuthError::Claims(ref m)) if m.contains("agent-token key")),
                "{:?}",
                verify(&forged, &k)
            );
        }
        // An agent key does not make app identities.
        assert!(matches!(
            verify(
                &sign(&agent_key, &json!({"sub": "u", "exp": exp, "kind": "app"})),
                &k
            ),
            Err(AuthError::Claims(_))
        ));
        // Expiry still counts for agents.
        assert_eq!(
            verify(
                &sign(&agent_key, &json!({"sub": "edge-1", "exp": now() - 120})),
                &k
            ),
            Err(AuthError::Expired)
        );
        // A third key is nobody.
        let stranger = messages::command::CommandSigner::generate();
        let only_agents = Keys::new(Some(SECRET), None, 0)
            .unwrap()
            .with_agent_keys(pem.as_bytes())
            .unwrap();
        assert_eq!(
            verify(
                &sign(&stranger, &json!({"sub": "edge-1", "exp": exp})),
                &only_agents
            ),
            Err(AuthError::Signature)
        );
        assert!(matches!(
            keys().with_agent_keys(b"no key here"),
            Err(KeyError::NoAgentKey)
        ));
    }

    #[test]
    fn refuses_each_kind_of_bad_token_distinctly() {
        let exp = now() + 60;
        let k = keys();
        assert_eq!(verify("nonsense", &k), Err(AuthError::Malformed));
        assert_eq!(verify("", &k), Err(AuthError::Malformed));
        assert_eq!(
            verify(&hs(&json!({"sub": "a", "exp": now() - 120})), &k),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify(
                &hs(&json!({"sub": "a", "exp": exp, "nbf": now() + 600})),
                &k
            ),
            Err(AuthError::NotYetValid)
        );
        let other = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "a", "exp": exp}),
            &EncodingKey::from_secret(b"another-secret-another-secret-another"),
        )
        .unwrap();
        assert_eq!(verify(&other, &k), Err(AuthError::Signature));
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "a", "exp": exp}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(verify(&hs384, &k), Err(AuthError::Algorithm));
        assert!(matches!(
            verify(&hs(&json!({"sub": "a"})), &k),
            Err(AuthError::Claims(_))
        ));
        assert!(matches!(
            verify(&hs(&json!({"exp": exp})), &k),
            Err(AuthError::Claims(_))
        ));
        assert!(matches!(
            verify(&hs(&json!({"sub": "a.b", "exp": exp})), &k),
            Err(AuthError::Claims(_))
        ));
        assert!(matches!(
            verify(&hs(&json!({"sub": "a", "exp": exp, "kind": "robot"})), &k),
            Err(AuthError::Claims(_))
        ));
        // An EdDSA token when only HS256 is configured.
        let hs_only = Keys::new(Some(SECRET), None, 0).unwrap();
        assert_eq!(
            verify(&ed(&json!({"sub": "a", "exp": exp})), &hs_only),
            Err(AuthError::Algorithm)
        );
    }

    #[test]
    fn minted_tokens_verify() {
        let user = UserId::new("zoe").unwrap();
        let rooms = [RoomId::new("lobby").unwrap()];
        let token = mint(
            SECRET,
            &user,
            ClientKind::App,
            &rooms,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let id = verify(&token, &keys()).unwrap();
        assert_eq!(
            (id.user_id, id.kind, id.allowed_rooms),
            (user, ClientKind::App, rooms.to_vec())
        );
    }

    #[test]
    fn key_configuration_is_checked() {
        assert!(matches!(Keys::new(None, None, 0), Err(KeyError::NoKeys)));
        assert!(matches!(
            Keys::new(Some(b"short"), None, 0),
            Err(KeyError::WeakSecret)
        ));
        assert!(matches!(
            Keys::new(None, Some(b"not pem"), 0),
            Err(KeyError::BadPublicKey(_))
        ));
        assert!(!format!("{:?}", keys()).contains("secret"));
    }

    #[test]
    fn token_comes_from_header_or_query() {
        assert_eq!(token_from(Some("Bearer abc"), ""), Some("abc".into()));
        assert_eq!(
            token_from(None, "codec=json&token=x%2Ey"),
            Some("x.y".into())
        );
        assert_eq!(token_from(Some("Basic zzz"), "token=q"), Some("q".into()));
        assert_eq!(token_from(None, "token="), None);
        assert_eq!(token_from(None, ""), None);
        assert_eq!(
            servicekit::query::first("a=1&b=%zz", "b"),
            Some("%zz".into())
        );
    }
}
