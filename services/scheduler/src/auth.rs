//! Named, scoped API keys: parsing `SCHEDULER_API_KEYS`, finding the key a request presents
//! without timing leaks, and deciding whether its scope allows the request.
//!
//! Each key has a name (the "actor" in the audit log and in logs; never the secret) and a
//! scope: [`Scope::Read`] may call the `GET` endpoints only, [`Scope::Operator`] may call
//! everything. The scope a request needs follows from its HTTP method, so a state-changing
//! route added later is closed to read keys without anyone remembering to say so.
//!
//! # Format
//! `SCHEDULER_API_KEYS` is a comma-separated list of `name:scope:secret` entries, e.g.
//! `ops:operator:3f9c…,dash:read:81ab…`. For compatibility with the earlier plain list, an
//! entry without any `:` is a secret on its own: an operator key named `key1`, `key2`, …
//! by its position (the service warns at start, because an audit log that says `key2` is
//! less useful than one that names a person or a system). Names are 1-64 of
//! `[A-Za-z0-9_.-]` and unique; secrets are at least 16 characters and unique; anything
//! else is a configuration error that names the entry by position, never by its secret.

use std::fmt;

use actix_web::HttpRequest;
use actix_web::http::{Method, StatusCode};
use servicekit::http::{ApiError, constant_time_eq};

/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest key name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// `GET` endpoints only (dashboards, monitoring, read-only tooling).
    Read,
    /// Everything, including creating and cancelling tasks.
    Operator,
}

impl Scope {
    /// The name used in the configuration and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "operator" => Some(Scope::Operator),
            _ => None,
        }
    }

    /// The scope a request with `method` needs: reads for `GET`/`HEAD`, operator otherwise.
    pub fn required_for(method: &Method) -> Scope {
        if method == Method::GET || method == Method::HEAD {
            Scope::Read
        } else {
            Scope::Operator
        }
    }

    /// Whether a key of this scope may do what `needed` asks.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

/// One configured API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    name: String,
    scope: Scope,
    secret: String,
}

// Hand-written so the secret never reaches a log through `{:?}` of the config.
impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ApiKey {
    /// A key with a name and a scope (not validated; [`validate`] does that).
    pub fn new(name: impl Into<String>, scope: Scope, secret: impl Into<String>) -> Self {
        ApiKey {
            name: name.into(),
            scope,
            secret: secret.into(),
        }
    }

    /// An operator key.
    pub fn operator(name: impl Into<String>, secret: impl Into<String>) -> Self {
        Self::new(name, Scope::Operator, secret)
    }

    /// A read-only key.
    pub fn read(name: impl Into<String>, secret: impl Into<String>) -> Self {
        Self::new(name, Scope::Read, secret)
    }

    /// Plain secrets (the earlier format) as operator keys named `key1`, `key2`, ….
    pub fn legacy(secrets: impl IntoIterator<Item = String>) -> Vec<ApiKey> {
        secrets
            .into_iter()
            .enumerate()
            .map(|(i, s)| ApiKey::operator(format!("key{}", i + 1), s))
            .collect()
    }

    /// The key's name: the actor in the audit log.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key's scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }
}

/// Why `SCHEDULER_API_KEYS` was refused. Messages name entries by position, never by secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No key at all.
    #[error("at least one API key is required (SCHEDULER_API_KEYS=name:scope:secret,...)")]
    Empty,
    /// An entry is not `name:scope:secret` (and not a bare secret either).
    #[error(
        "API key entry {0}: expected name:scope:secret (scope read or operator), or a bare secret without ':'"
    )]
    Malformed(usize),
    /// Unknown scope.
    #[error("API key entry {entry} ({name}): unknown scope {scope:?}; use read or operator")]
    Scope {
        /// 1-based position.
        entry: usize,
        /// The key's name.
        name: String,
        /// What was given.
        scope: String,
    },
    /// A name outside `[A-Za-z0-9_.-]{1,64}`.
    #[error("API key entry {0}: the name must be 1-64 of A-Z a-z 0-9 _ . -")]
    Name(usize),
    /// Two keys with one name.
    #[error("API key name {0:?} is used twice")]
    DuplicateName(String),
    /// A secret shorter than [`MIN_SECRET_LEN`].
    #[error("API key {0:?}: the secret must have at least {MIN_SECRET_LEN} characters")]
    ShortSecret(String),
    /// Two keys with one secret: the actor of a request would be ambiguous.
    #[error("API keys {0:?} and {1:?} have the same secret")]
    DuplicateSecret(String, String),
}

/// Parses `SCHEDULER_API_KEYS` (see the module docs) and validates the result.
pub fn parse_keys(list: &str) -> Result<Vec<ApiKey>, KeyError> {
    let mut keys = Vec::new();
    for (i, entry) in list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let n = i + 1;
        let key = match entry.split_once(':') {
            None => ApiKey::operator(format!("key{n}"), entry),
            Some((name, rest)) => {
                let (scope, secret) = rest.split_once(':').ok_or(KeyError::Malformed(n))?;
                let scope = Scope::parse(scope).ok_or_else(|| KeyError::Scope {
                    entry: n,
                    name: name.to_owned(),
                    scope: scope.to_owned(),
                })?;
                if !valid_name(name) {
                    return Err(KeyError::Name(n));
                }
                ApiKey::new(name, scope, secret)
            }
        };
        keys.push(key);
    }
    validate(&keys)?;
    Ok(keys)
}

/// Whether an entry of `list` used the earlier bare-secret form (worth a warning at start).
pub fn has_unnamed(list: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|e| !e.is_empty() && !e.contains(':'))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks a key set: non-empty, valid unique names, long unique secrets.
pub fn validate(keys: &[ApiKey]) -> Result<(), KeyError> {
    if keys.is_empty() {
        return Err(KeyError::Empty);
    }
    for (i, k) in keys.iter().enumerate() {
        if !valid_name(&k.name) {
            return Err(KeyError::Name(i + 1));
        }
        if k.secret.chars().count() < MIN_SECRET_LEN {
            return Err(KeyError::ShortSecret(k.name.clone()));
        }
        for earlier in &keys[..i] {
            if earlier.name == k.name {
                return Err(KeyError::DuplicateName(k.name.clone()));
            }
            if earlier.secret == k.secret {
                return Err(KeyError::DuplicateSecret(
                    earlier.name.clone(),
                    k.name.clone(),
                ));
            }
        }
    }
    Ok(())
}

/// The key `presented` matches, comparing against every key in full whatever matches, so
/// neither how much of a secret is right nor which key matched shows in the timing.
pub fn find<'k>(keys: &'k [ApiKey], presented: &str) -> Option<&'k ApiKey> {
    keys.iter().fold(None, |found, k| {
        let hit = constant_time_eq(k.secret.as_bytes(), presented.as_bytes());
        if hit { Some(k) } else { found }
    })
}

/// Who made a request: the name and scope of the key it presented, and the trace it belongs
/// to (for the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The key's name.
    pub name: String,
    /// The key's scope.
    pub scope: Scope,
    /// The request's trace id (32 hex digits) when it has one.
    pub trace_id: Option<String>,
}

impl Actor {
    /// Uses the trace id of the request's server span, if it has one (a span started here
    /// has a trace id even when the caller sent no `traceparent`).
    pub fn traced(mut self, span: &servicekit::telemetry::MessageSpan) -> Self {
        let id = span.trace_id();
        if !id.is_empty() {
            self.trace_id = Some(id);
        }
        self
    }
}

/// Authenticates `Authorization: Bearer <secret>` against `keys` and checks the key's scope
/// against the request's method: 401 `unauthorized` for a missing or unknown key, 403
/// `forbidden` for a read key on anything but `GET`/`HEAD`.
pub fn authorize(req: &HttpRequest, keys: &[ApiKey]) -> Result<Actor, ApiError> {
    let presented = servicekit::http::bearer(req);
    let key = presented.and_then(|p| find(keys, p)).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown API key",
        )
    })?;
    let needed = Scope::required_for(req.method());
    if !key.scope.allows(needed) {
        tracing::warn!(
            actor = %key.name,
            method = %req.method(),
            path = req.path(),
            "A read-only API key was refused a state-changing call."
        );
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "API key {:?} has scope {}; {} {} needs scope {}",
                key.name,
                key.scope.as_str(),
                req.method(),
                req.match_pattern().unwrap_or_else(|| req.path().to_owned()),
                needed.as_str()
            ),
        ));
    }
    let trace_id = req
        .headers()
        .get(messages::headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(messages::TraceContext::parse_traceparent)
        .map(|t| t.trace_id_hex());
    Ok(Actor {
        name: key.name.clone(),
        scope: key.scope,
        trace_id,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S1: &str = "0123456789abcdef-one";
    const S2: &str = "0123456789abcdef-two";

    #[test]
    fn named_keys_parse_with_their_scopes() {
        let keys = parse_keys(&format!(" ops:operator:{S1} , dash:read:{S2} ")).unwrap();
        assert_eq!(
            keys,
            vec![ApiKey::operator("ops", S1), ApiKey::read("dash", S2)]
        );
        // Secrets may contain ':' once the name and scope are given.
        let keys = parse_keys("x:read:abc:def:0123456789abcdef").unwrap();
        assert_eq!(keys[0].secret, "abc:def:0123456789abcdef");
    }

    #[test]
    fn bare_secrets_stay_operator_keys_named_by_position() {
        let keys = parse_keys(&format!("{S1},{S2}")).unwrap();
        assert_eq!(
            keys,
            vec![ApiKey::operator("key1", S1), ApiKey::operator("key2", S2)]
        );
        assert!(has_unnamed(&format!("ops:operator:{S1},{S2}")));
        assert!(!has_unnamed(&format!("ops:operator:{S1}")));
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_secrets() {
        let cases = [
            ("", KeyError::Empty),
            (" , ", KeyError::Empty),
            ("short", KeyError::ShortSecret("key1".into())),
            (&format!("ops:{S1}") as &str, KeyError::Malformed(1)),
            (
                &format!("ops:admin:{S1}"),
                KeyError::Scope {
                    entry: 1,
                    name: "ops".into(),
                    scope: "admin".into(),
                },
            ),
            (&format!("a b:read:{S1}"), KeyError::Name(1)),
            (&format!(":read:{S1}"), KeyError::Name(1)),
            (
                &format!("ops:read:{S1},ops:operator:{S2}"),
                KeyError::DuplicateName("ops".into()),
            ),
            (
                &format!("a:read:{S1},b:operator:{S1}"),
                KeyError::DuplicateSecret("a".into(), "b".into()),
            ),
        ];
        for (list, want) in cases {
            let got = parse_keys(list).unwrap_err();
            assert_eq!(got, want, "{list:?}");
            assert!(!got.to_string().contains(S1), "{got}");
        }
    }

    #[test]
    fn the_debug_form_hides_the_secret() {
        let k = ApiKey::operator("ops", S1);
        assert!(!format!("{k:?}").contains(S1));
    }

    #[test]
    fn find_compares_whole_secrets_and_returns_the_matching_key() {
        let keys = vec![ApiKey::operator("ops", S1), ApiKey::read("dash", S2)];
        assert_eq!(find(&keys, S1).map(ApiKey::name), Some("ops"));
        assert_eq!(find(&keys, S2).map(ApiKey::name), Some("dash"));
        // Prefixes, extensions, one changed byte and the empty string match nothing.
        assert!(find(&keys, &S1[..S1.len() - 1]).is_none());
        assert!(find(&keys, &format!("{S1}x")).is_none());
        assert!(find(&keys, "0123456789abcdef-onf").is_none());
        assert!(find(&keys, "").is_none());
        assert!(find(&[], S1).is_none());
    }

    #[test]
    fn scopes_follow_the_method() {
        assert_eq!(Scope::required_for(&Method::GET), Scope::Read);
        assert_eq!(Scope::required_for(&Method::HEAD), Scope::Read);
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(Scope::required_for(&m), Scope::Operator);
        }
        assert!(Scope::Operator.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Operator));
    }

    #[test]
    fn requests_are_authorised_by_key_and_method() {
        let keys = vec![ApiKey::operator("ops", S1), ApiKey::read("dash", S2)];
        let req = |method: Method, key: &str| {
            actix_web::test::TestRequest::default()
                .method(method)
                .uri("/v1/tasks")
                .insert_header(("authorization", format!("Bearer {key}")))
                .to_http_request()
        };
        let ops = authorize(&req(Method::POST, S1), &keys).unwrap();
        assert_eq!((ops.name.as_str(), ops.scope), ("ops", Scope::Operator));
        assert_eq!(
            authorize(&req(Method::GET, S2), &keys).unwrap().name,
            "dash"
        );
        let refused = authorize(&req(Method::POST, S2), &keys).unwrap_err();
        assert_eq!(
            (refused.status, refused.error),
            (StatusCode::FORBIDDEN, "forbidden")
        );
        assert!(refused.detail.contains("dash"), "{}", refused.detail);
        let unknown = authorize(&req(Method::GET, "nope-nope-nope-nope"), &keys).unwrap_err();
        assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
        let none = actix_web::test::TestRequest::default().to_http_request();
        assert_eq!(
            authorize(&none, &keys).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }
}
