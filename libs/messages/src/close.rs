//! WebSocket close codes and error-frame codes: what a client is told when something goes
//! wrong, and whether it should reconnect.
//!
//! Close codes are split into two ranges (as Centrifugo does) so a client library can
//! decide without a table: 4000-4499 means "reconnect with backoff", 4500-4999 means "do
//! not reconnect until something changes" (a bad token, a client bug). Reasons stay under
//! the 123 bytes a close frame can carry.

use std::fmt;

/// The longest close reason a WebSocket close frame can carry, in bytes (125 bytes of
/// control-frame payload minus the 2-byte code). Longer reasons are cut to this.
pub const MAX_REASON_LEN: usize = 123;

/// A close code this system sends, with its wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The gateway is draining or shutting down; reconnect (after the delay a reconnect
    /// frame gave, if one came).
    Shutdown = 4000,
    /// No heartbeat or other frame arrived before the session deadline.
    HeartbeatTimeout = 4001,
    /// The client did not read fast enough; its outbound queue overflowed.
    SlowConsumer = 4002,
    /// The gateway cannot serve (bus unreachable, worker-id lease lost).
    NotReady = 4003,
    /// The client kept sending faster than its rate limit allows.
    RateLimited = 4004,
    /// Something failed inside the gateway.
    InternalError = 4005,
    /// A frame could not be decoded; the stream can no longer be trusted.
    ProtocolError = 4500,
    /// A frame exceeded the size limit.
    FrameTooLarge = 4501,
    /// The credential expired or was revoked while connected.
    Unauthorized = 4502,
    /// A service asked for this connection to be closed for good.
    Kicked = 4503,
    /// The client speaks a protocol version this gateway does not.
    UnsupportedVersion = 4504,
    /// The operator revoked this identity (an agent node); it will be refused until it is
    /// enrolled again.
    Revoked = 4505,
}

impl CloseCode {
    /// Every code, for tests and documentation.
    pub const ALL: [CloseCode; 12] = [
        CloseCode::Shutdown,
        CloseCode::HeartbeatTimeout,
        CloseCode::SlowConsumer,
        CloseCode::NotReady,
        CloseCode::RateLimited,
        CloseCode::InternalError,
        CloseCode::ProtocolError,
        CloseCode::FrameTooLarge,
        CloseCode::Unauthorized,
        CloseCode::Kicked,
        CloseCode::UnsupportedVersion,
        CloseCode::Revoked,
    ];

    /// The wire value.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a wire value, if it is one of ours.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Whether a client should reconnect (with backoff) after this close.
    pub fn should_reconnect(self) -> bool {
        self.code() < 4500
    }

    /// A short reason for the close frame (well under 123 bytes).
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Shutdown => "server shutting down",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::NotReady => "server not ready",
            CloseCode::RateLimited => "rate limit exceeded",
            CloseCode::InternalError => "internal error",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Kicked => "closed by server",
            CloseCode::UnsupportedVersion => "unsupported protocol version",
            CloseCode::Revoked => "credential revoked",
        }
    }

    /// Snake-case name for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCode::Shutdown => "shutdown",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::NotReady => "not_ready",
            CloseCode::RateLimited => "rate_limited",
            CloseCode::InternalError => "internal_error",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::FrameTooLarge => "frame_too_large",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Kicked => "kicked",
            CloseCode::UnsupportedVersion => "unsupported_version",
            CloseCode::Revoked => "revoked",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.as_str())
    }
}

/// The code in an error frame's body. Loosely modelled on HTTP status codes so they read
/// naturally; they are not HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded.
    BadFrame = 400,
    /// The route is malformed or too long.
    BadRoute = 401,
    /// The request was refused (for example a join the services did not authorise).
    Forbidden = 403,
    /// No service handles this route.
    UnknownRoute = 404,
    /// The frame kind is not valid in this direction or at this point.
    UnexpectedFrame = 405,
    /// The body exceeds the size limit.
    TooLarge = 413,
    /// The protocol version is not supported.
    UnsupportedVersion = 426,
    /// The per-connection rate limit was exceeded; the frame was dropped.
    RateLimited = 429,
    /// Something failed inside the system.
    Internal = 500,
    /// The message could not be handed to the bus (outage); it was not delivered.
    Unavailable = 503,
    /// The services did not answer in time.
    Timeout = 504,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadFrame,
        ErrorCode::BadRoute,
        ErrorCode::Forbidden,
        ErrorCode::UnknownRoute,
        ErrorCode::UnexpectedFrame,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
    ];

    /// The wire value.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a wire value.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Snake-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BadRoute => "bad_route",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnknownRoute => "unknown_route",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip_and_sit_in_their_ranges() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
            assert!((4000..5000).contains(&code.code()));
            assert!(code.reason().len() < 123);
        }
        assert!(CloseCode::HeartbeatTimeout.should_reconnect());
        assert!(CloseCode::SlowConsumer.should_reconnect());
        assert!(!CloseCode::ProtocolError.should_reconnect());
        assert!(!CloseCode::Unauthorized.should_reconnect());
        assert_eq!(CloseCode::from_code(1000), None);
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
        }
        assert_eq!(ErrorCode::from_code(999), None);
    }
}
