//! How every service reads its NATS setting: a comma-separated list of server URLs
//! (`nats://n1:4222,nats://n2:4222`; the client fails over between them) with optional
//! credentials in the userinfo (`nats://user:pass@host:4222`, or `nats://token@host` for
//! token auth). async-nats takes neither from one string, so this module splits the list,
//! moves the credentials into the connect options, and gives a form safe to log.
//!
//! It also owns how a service connects ([`connect`]: named client, reconnect forever,
//! connection losses and reconnects logged) and
//! the runtime the client lives on ([`runtime`]): a tokio runtime of its own, apart from
//! the actix workers, so a busy HTTP worker never starves the NATS connection.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};

/// How long one connection attempt may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the client pings its server. The client gives a connection up after two
/// unanswered pings, so a silently dead path (a partition: no RST, no FIN) is noticed in
/// 10 to 15 s rather than the 2 to 3 minutes of the library's 60 s default; the cost is one
/// PING/PONG per connection every 5 s.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Why a NATS setting is unusable.
#[derive(Debug, thiserror::Error)]
pub enum NatsUrlError {
    /// Nothing but separators.
    #[error("no NATS server URL given")]
    Empty,
    /// One entry does not parse.
    #[error("NATS server URL {index} is invalid: {reason}")]
    Invalid {
        /// 1-based position in the list.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Entries name different credentials; the client has one identity.
    #[error("all NATS server URLs must carry the same credentials")]
    MixedCredentials,
}

/// Credentials from a URL's userinfo.
#[derive(Clone, PartialEq, Eq)]
enum Credentials {
    UserPassword(String, String),
    Token(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::UserPassword(user, _) => write!(f, "UserPassword({user}, ***)"),
            Credentials::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// A parsed NATS setting.
#[derive(Clone)]
pub struct NatsTarget {
    servers: Vec<ServerAddr>,
    credentials: Option<Credentials>,
}

impl std::fmt::Debug for NatsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl NatsTarget {
    /// Parses `urls`: comma-separated, each a URL or `host:port` (`nats://` and port 4222
    /// are assumed when missing).
    pub fn parse(urls: &str) -> Result<Self, NatsUrlError> {
        let mut servers = Vec::new();
        let mut credentials: Option<Option<Credentials>> = None;
        for (i, raw) in urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let addr: ServerAddr =
                raw.parse()
                    .map_err(|e: std::io::Error| NatsUrlError::Invalid {
                        index: i + 1,
                        reason: e.to_string(),
                    })?;
            let these = match (addr.username(), addr.password()) {
                (Some(user), Some(pass)) => {
                    Some(Credentials::UserPassword(decode(user), decode(pass)))
                }
                (Some(token), None) => Some(Credentials::Token(decode(token))),
                _ => None,
            };
            match &credentials {
                None => credentials = Some(these),
                Some(first) if *first == these => {}
                Some(_) => return Err(NatsUrlError::MixedCredentials),
            }
            servers.push(addr);
        }
        if servers.is_empty() {
            return Err(NatsUrlError::Empty);
        }
        Ok(NatsTarget {
            servers,
            credentials: credentials.flatten(),
        })
    }

    /// Connect options carrying the credentials, to add the service's own settings to.
    pub fn options(&self) -> ConnectOptions {
        let options = ConnectOptions::new();
        match &self.credentials {
            Some(Credentials::UserPassword(user, pass)) => {
                options.user_and_password(user.clone(), pass.clone())
            }
            Some(Credentials::Token(token)) => options.token(token.clone()),
            None => options,
        }
    }

    /// The user and password from the userinfo, for a client that speaks the protocol
    /// itself (the gateway's interest link).
    pub fn user_password(&self) -> Option<(&str, &str)> {
        match &self.credentials {
            Some(Credentials::UserPassword(user, pass)) => Some((user, pass)),
            _ => None,
        }
    }

    /// The token from the userinfo, if the URL names one instead of a user and password.
    pub fn token(&self) -> Option<&str> {
        match &self.credentials {
            Some(Credentials::Token(token)) => Some(token),
            _ => None,
        }
    }

    /// The servers to connect to (credentials are in [`NatsTarget::options`]).
    pub fn servers(&self) -> Vec<ServerAddr> {
        self.servers.clone()
    }

    /// The list for logs: hosts and ports, the user name if any, never a password or token.
    pub fn redacted(&self) -> String {
        let user = match &self.credentials {
            Some(Credentials::UserPassword(user, _)) => format!("{user}:***@"),
            Some(Credentials::Token(_)) => "***@".to_owned(),
            None => String::new(),
        };
        self.servers
            .iter()
            .map(|s| format!("nats://{user}{}:{}", s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Why no NATS client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The NATS setting is unusable.
    #[error(transparent)]
    Url(#[from] NatsUrlError),
    /// The client refused its options.
    #[error("connecting to {servers}: {source}")]
    Connect {
        /// The servers, redacted.
        servers: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Connects to `urls` (see [`NatsTarget::parse`]) as every service does: the client is
/// named `name` (visible in the server's connection list), the first connection is
/// retried in the background rather than failing start-up, and reconnects never stop.
/// Call it on the runtime the client should live on ([`runtime`]).
pub async fn connect(urls: &str, name: &str) -> Result<Client, ConnectError> {
    let target = NatsTarget::parse(urls)?;
    target
        .options()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(CONNECTION_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .event_callback(log_event(name.to_owned()))
        .connect(target.servers())
        .await
        .map_err(|source| ConnectError::Connect {
            servers: target.redacted(),
            source,
        })
}

/// Logs the client's connection events with the client's name, a loss at warn level, so an
/// operator sees a NATS node loss and the reconnect in every service's log (async-nats's own
/// line is at info under `async_nats` and does not say which client).
fn log_event(
    name: String,
) -> impl Fn(async_nats::Event) -> std::future::Ready<()> + Send + Sync + 'static {
    use async_nats::Event;
    move |event| {
        match event {
            Event::Connected => tracing::info!(client = %name, "NATS connected."),
            Event::Disconnected => {
                tracing::warn!(client = %name, "NATS connection lost; reconnecting.");
            }
            Event::LameDuckMode => tracing::warn!(
                client = %name,
                "NATS server entering lame-duck mode; the client will move to another."
            ),
            Event::SlowConsumer(sid) => tracing::warn!(
                client = %name,
                subscription = sid,
                "NATS subscription too slow; messages were dropped."
            ),
            Event::ServerError(e) => {
                tracing::warn!(client = %name, error = %e, "NATS server error.");
            }
            Event::ClientError(e) => {
                tracing::warn!(client = %name, error = %e, "NATS client error.");
            }
            Event::Draining | Event::Closed => {
                tracing::debug!(client = %name, event = %event, "NATS client event.");
            }
        }
        std::future::ready(())
    }
}

/// A runtime for the NATS client and its consumers: one worker thread named `name`.
pub fn runtime(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
}

/// Shuts a runtime down from async code (where dropping one would panic): on a blocking
/// thread, giving its tasks up to `grace`.
pub async fn shutdown_runtime(runtime: tokio::runtime::Runtime, grace: Duration) {
    let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(grace)).await;
}

/// Percent-decodes userinfo (a password may contain `@` or `:` written as `%40`, `%3A`).
fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_with_credentials_is_split_and_redacted() {
        let t =
            NatsTarget::parse("nats://gw:s%40cret@n1:4222, nats://gw:s%40cret@n2:4333").unwrap();
        assert_eq!(t.servers().len(), 2);
        assert_eq!(
            t.credentials,
            Some(Credentials::UserPassword("gw".into(), "s@cret".into()))
        );
        assert_eq!(t.redacted(), "nats://gw:***@n1:4222,nats://gw:***@n2:4333");
        assert!(!format!("{t:?}").contains("cret"));
    }

    #[test]
    fn plain_hosts_tokens_and_bad_input() {
        let t = NatsTarget::parse("127.0.0.1:4222").unwrap();
        assert_eq!(t.credentials, None);
        assert_eq!(t.redacted(), "nats://127.0.0.1:4222");
        let t = NatsTarget::parse("nats://tok@h").unwrap();
        assert_eq!(t.credentials, Some(Credentials::Token("tok".into())));
        assert!(matches!(NatsTarget::parse(" , "), Err(NatsUrlError::Empty)));
        assert!(matches!(
            NatsTarget::parse("nats://a:4222,http://b"),
            Err(NatsUrlError::Invalid { index: 2, .. })
        ));
        assert!(matches!(
            NatsTarget::parse("nats://a:x@h1,nats://b:y@h2"),
            Err(NatsUrlError::MixedCredentials)
        ));
    }
}
