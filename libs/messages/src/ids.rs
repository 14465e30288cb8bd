//! Identifier newtypes: socket ids (Snowflakes), user, room and gateway ids, and the kind of
//! client. Every id that ends up inside a NATS subject is validated here, once, so a
//! client-supplied string can never inject a wildcard or an extra subject token.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::frame::{RouteError, is_token_byte, validate_dotted};

/// Longest user, gateway or room id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty string.
    #[error("id is empty")]
    Empty,
    /// Longer than [`MAX_ID_LEN`].
    #[error("id is {0} bytes, the maximum is {MAX_ID_LEN}")]
    TooLong(usize),
    /// A byte outside `[A-Za-z0-9_-:@=+]` (rooms also allow `.` between tokens).
    #[error("byte {byte:#04x} at offset {at} is not allowed in an id")]
    BadByte {
        /// The offending byte.
        byte: u8,
        /// Its offset.
        at: usize,
    },
    /// A room id with an empty dot-separated token.
    #[error("room id has an empty token")]
    EmptyToken,
    /// Not a decimal 64-bit socket id.
    #[error("not a socket id")]
    NotASocketId,
    /// Not `app` or `agent`.
    #[error("unknown client kind (expected app or agent)")]
    UnknownClientKind,
}

fn validate_token(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    match s.bytes().enumerate().find(|&(_, b)| !is_token_byte(b)) {
        Some((at, byte)) => Err(IdError::BadByte { byte, at }),
        None => Ok(()),
    }
}

fn validate_room(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    validate_dotted(s.as_bytes()).map_err(|e| match e {
        RouteError::BadByte { byte, at } => IdError::BadByte { byte, at },
        RouteError::EmptyToken => IdError::EmptyToken,
        RouteError::TooLong => IdError::TooLong(s.len()),
    })
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $validate:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                $validate(&value)?;
                Ok(Self(value))
            }

            /// The id text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
    };
}

string_id!(
    /// An application user (or, for agents, the node id), from the token's subject claim.
    UserId,
    validate_token
);
string_id!(
    /// A gateway replica's stable instance name (for example the pod or container name).
    GatewayId,
    validate_token
);
string_id!(
    /// A room: one or more dot-separated tokens (`chat.lobby`), as in a join frame's route.
    RoomId,
    validate_room
);

/// A socket id: a 64-bit Snowflake minted by the gateway that accepted the connection.
///
/// Serialised as a number in binary formats (MessagePack) and as a decimal string in
/// human-readable ones (JSON), because JavaScript numbers lose precision above 2^53.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u64);

impl SocketId {
    /// The raw value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SocketId({})", self.0)
    }
}

impl FromStr for SocketId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        // u64::from_str accepts a leading '+'; ids are plain digits only.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::NotASocketId);
        }
        s.parse().map(SocketId).map_err(|_| IdError::NotASocketId)
    }
}

impl Serialize for SocketId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(&self.0)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for SocketId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(u64),
            Str(String),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Num(n) => Ok(SocketId(n)),
            Repr::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What kind of client holds a connection; decides which services its traffic goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// A browser or app user; traffic goes to ws-api and product services.
    #[default]
    App,
    /// An edge agent; traffic goes to the scheduler.
    Agent,
}

impl ClientKind {
    /// Both kinds.
    pub const ALL: [ClientKind; 2] = [ClientKind::App, ClientKind::Agent];

    /// The subject token and claim value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::App => "app",
            ClientKind::Agent => "agent",
        }
    }
}

impl FromStr for ClientKind {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s {
            "app" => Ok(ClientKind::App),
            "agent" => Ok(ClientKind::Agent),
            _ => Err(IdError::UnknownClientKind),
        }
    }
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_refuse_subject_syntax() {
        assert!(UserId::new("user:42@tenant").is_ok());
        assert!(UserId::new("node-17:eu").is_ok());
        assert_eq!(UserId::new(""), Err(IdError::Empty));
        assert_eq!(
            UserId::new("a.b"),
            Err(IdError::BadByte { byte: b'.', at: 1 })
        );
        assert_eq!(
            UserId::new("a*"),
            Err(IdError::BadByte { byte: b'*', at: 1 })
        );
        assert_eq!(
            UserId::new(">"),
            Err(IdError::BadByte { byte: b'>', at: 0 })
        );
        assert_eq!(UserId::new("x".repeat(129)), Err(IdError::TooLong(129)));
        assert!(GatewayId::new("ws-gateway-1").is_ok());
        assert!(RoomId::new("chat.lobby").is_ok());
        assert_eq!(RoomId::new("chat..lobby"), Err(IdError::EmptyToken));
        assert_eq!(RoomId::new(""), Err(IdError::Empty));
    }

    #[test]
    fn ids_validate_when_deserialised() {
        let ok: UserId = serde_json::from_str("\"bob\"").unwrap();
        assert_eq!(ok.as_str(), "bob");
        assert!(serde_json::from_str::<UserId>("\"b.o.b\"").is_err());
        assert!(serde_json::from_str::<RoomId>("\"a b\"").is_err());
    }

    #[test]
    fn socket_ids_are_strings_in_json_and_numbers_in_msgpack() {
        let id = SocketId(u64::MAX - 1);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", u64::MAX - 1));
        assert_eq!(serde_json::from_str::<SocketId>(&json).unwrap(), id);
        assert_eq!(
            serde_json::from_str::<SocketId>("17").unwrap(),
            SocketId(17)
        );
        let packed = rmp_serde::to_vec(&id).unwrap();
        assert_eq!(packed[0], 0xcf, "u64 marker");
        assert_eq!(rmp_serde::from_slice::<SocketId>(&packed).unwrap(), id);
        assert_eq!("+1".parse::<SocketId>(), Err(IdError::NotASocketId));
        assert_eq!("".parse::<SocketId>(), Err(IdError::NotASocketId));
        assert!("99999999999999999999999".parse::<SocketId>().is_err());
    }

    #[test]
    fn client_kinds_round_trip() {
        for kind in ClientKind::ALL {
            assert_eq!(kind.as_str().parse::<ClientKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        assert!("robot".parse::<ClientKind>().is_err());
    }
}
