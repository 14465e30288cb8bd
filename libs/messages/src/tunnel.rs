//! TCP tunnels to an agent's ports: the wire contract between the scheduler and an agent
//! (`docs/protocol.md` 12.12, ADR 0014) and the credit-window arithmetic both ends use.
//!
//! A stream is opened by a signed push ([`OPEN`], [`Open`]): it names the stream, carries a
//! random 128-bit token, the remote address and the window the agent may use upward. Every
//! later frame of the stream, in either direction, carries the stream id and that token and
//! is not signed: the signature authorizes the stream, the token binds the later frames to
//! it (ADR 0014 has the argument). Data flows only within credit: each receiver grants bytes
//! ([`Window`]) as it delivers them onward, and a sender never has more bytes in flight than
//! it was granted ([`Credit`]), so one stream's bulk transfer cannot fill the agent's single
//! connection and starve heartbeats or other streams.

use serde::{Deserialize, Serialize};

/// Signed push, scheduler -> agent: open a stream ([`Open`]).
pub const OPEN: &str = "agent.tunnel.open";
/// Both ways: bytes of a stream ([`Data`]).
pub const DATA: &str = "agent.tunnel.data";
/// Both ways: credit for more bytes ([`Window`]).
pub const WINDOW: &str = "agent.tunnel.window";
/// Both ways: the stream ended ([`Close`]).
pub const CLOSE: &str = "agent.tunnel.close";
/// Agent -> scheduler: the remote address was dialled ([`Opened`]).
pub const OPENED: &str = "agent.tunnel.opened";

/// Unsigned downstream routes: bound to a stream by its token, not by a signature.
pub const UNSIGNED_DOWN: [&str; 3] = [DATA, WINDOW, CLOSE];

/// Largest data chunk, bytes: far below the gateway's default 64 KiB body limit once
/// wrapped in MessagePack with the stream id and token.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Default initial window, bytes, each way.
pub const DEFAULT_WINDOW: u32 = 256 * 1024;

/// Largest window either side may grant in total, bytes.
pub const MAX_WINDOW: u64 = 16 * 1024 * 1024;

/// Length of a stream token, bytes.
pub const TOKEN_LEN: usize = 16;

/// Open a stream to `remote` (signed push).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// Stream id, unique per scheduler instance.
    pub stream: u64,
    /// [`TOKEN_LEN`] random bytes every later frame of the stream carries.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// `host:port` to dial; the agent dials it only if it is on its allowlist.
    pub remote: String,
    /// Bytes the agent may send upward before the scheduler grants more.
    pub window: u32,
    /// Close the stream after this long without data either way, ms.
    pub idle_timeout_ms: u64,
    /// The operator (API key name) who opened it, for the agent's log.
    #[serde(default)]
    pub actor: String,
}

/// The agent dialled the remote address; `window` is the bytes the scheduler may send
/// down before the agent grants more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {
    /// Stream id.
    pub stream: u64,
    /// The stream's token.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// Initial downward window, bytes.
    pub window: u32,
}

/// Bytes of a stream, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data {
    /// Stream id.
    pub stream: u64,
    /// The stream's token.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// Chunk number in this direction, from 0: a jump means the bus lost a chunk, and the
    /// receiver resets the stream (a byte stream cannot have holes).
    pub seq: u64,
    /// The bytes (at most [`MAX_CHUNK`]).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Credit: the sender of this frame delivered `grant` more bytes onward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Stream id.
    pub stream: u64,
    /// The stream's token.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// Bytes granted.
    pub grant: u32,
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// One end closed its connection normally.
    Closed,
    /// The remote address is not on the agent's tunnel allowlist.
    NotAllowed,
    /// The agent could not dial the remote address.
    DialFailed,
    /// Too many streams open (the agent's or the scheduler's cap).
    TooMany,
    /// No data either way for the idle timeout.
    Idle,
    /// A protocol violation (credit exceeded, a sequence gap, a bad token) or an I/O error:
    /// the stream was reset.
    Reset,
    /// The agent's connection or the operator's went away.
    Gone,
}

impl CloseReason {
    /// The snake-case name (as on the wire).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::NotAllowed => "not_allowed",
            CloseReason::DialFailed => "dial_failed",
            CloseReason::TooMany => "too_many",
            CloseReason::Idle => "idle",
            CloseReason::Reset => "reset",
            CloseReason::Gone => "gone",
        }
    }
}

/// The stream ended; nothing more is sent on it either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    /// Stream id.
    pub stream: u64,
    /// The stream's token.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// Why.
    pub reason: CloseReason,
    /// Human-readable detail.
    #[serde(default)]
    pub detail: String,
}

/// Whether two tokens are equal, in time independent of where they differ (a token is the
/// only thing that binds an unsigned frame to its stream).
pub fn token_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why credit accounting refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    /// The peer sent more bytes than it was granted.
    #[error("peer sent {got} bytes with {granted} granted")]
    Exceeded {
        /// Bytes in the frame.
        got: u64,
        /// Credit left before it.
        granted: u64,
    },
    /// A grant would raise the window above [`MAX_WINDOW`].
    #[error("grant raises the window above {MAX_WINDOW} bytes")]
    TooLarge,
}

/// The sending side's credit: bytes it may still send before the peer grants more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    available: u64,
}

impl Credit {
    /// Starts with the peer's initial window (at most [`MAX_WINDOW`]: a peer announcing
    /// more would only make this side queue more than anyone wants in flight).
    pub fn new(window: u32) -> Self {
        Credit {
            available: u64::from(window).min(MAX_WINDOW),
        }
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.available
    }

    /// How many of `want` bytes may be sent now (at most [`MAX_CHUNK`]); takes them.
    pub fn take(&mut self, want: usize) -> usize {
        let n = want
            .min(MAX_CHUNK)
            .min(usize::try_from(self.available).unwrap_or(usize::MAX));
        self.available -= n as u64;
        n
    }

    /// The peer granted `grant` more bytes.
    pub fn grant(&mut self, grant: u32) -> Result<(), CreditError> {
        let next = self.available + u64::from(grant);
        if next > MAX_WINDOW {
            return Err(CreditError::TooLarge);
        }
        self.available = next;
        Ok(())
    }
}

/// The receiving side's window: what the peer may still send, and the bytes delivered
/// onward but not yet granted back. Grants go out in batches of half the window, so a bulk
/// transfer costs one window frame per half window, not one per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receive {
    window: u32,
    outstanding: u64,
    delivered: u64,
}

impl Receive {
    /// A window of `window` bytes (what was granted initially).
    pub fn new(window: u32) -> Self {
        Receive {
            window,
            outstanding: u64::from(window),
            delivered: 0,
        }
    }

    /// `len` bytes arrived: refused if the peer had less credit.
    pub fn arrived(&mut self, len: usize) -> Result<(), CreditError> {
        let got = len as u64;
        if got > self.outstanding {
            return Err(CreditError::Exceeded {
                got,
                granted: self.outstanding,
            });
        }
        self.outstanding -= got;
        Ok(())
    }

    /// `len` bytes were delivered onward; returns a grant to send when half a window (or
    /// more) has been delivered since the last one.
    pub fn delivered(&mut self, len: usize) -> Option<u32> {
        self.delivered += len as u64;
        if self.delivered * 2 < u64::from(self.window).max(1) {
            return None;
        }
        let grant = u32::try_from(self.delivered).unwrap_or(u32::MAX);
        self.delivered -= u64::from(grant);
        self.outstanding += u64::from(grant);
        Some(grant)
    }
}

/// Whether `remote` is a `host:port` the allowlist names exactly (no wildcards: an
/// allowlist entry is a promise about one service).
pub fn allowed(allowlist: &[String], remote: &str) -> bool {
    allowlist.iter().any(|a| a == remote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{from_bus, to_bus};

    #[test]
    fn a_sender_never_exceeds_its_credit() {
        let mut c = Credit::new(100);
        assert_eq!(c.take(60), 60);
        assert_eq!(c.take(60), 40);
        assert_eq!(c.take(60), 0);
        c.grant(10).unwrap();
        assert_eq!(c.take(60), 10);
        let mut big = Credit::new(u32::MAX);
        assert_eq!(big.available(), MAX_WINDOW);
        assert_eq!(big.take(1 << 20), MAX_CHUNK);
        assert_eq!(
            Credit::new(0).grant(u32::MAX),
            Err(CreditError::TooLarge),
            "a peer cannot grant unbounded windows"
        );
    }

    #[test]
    fn a_receiver_refuses_bytes_beyond_its_grant_and_grants_in_half_windows() {
        let mut r = Receive::new(100);
        r.arrived(60).unwrap();
        assert_eq!(r.delivered(30), None);
        assert_eq!(r.delivered(30), Some(60));
        r.arrived(100).unwrap();
        assert_eq!(
            r.arrived(1),
            Err(CreditError::Exceeded { got: 1, granted: 0 })
        );
        assert_eq!(r.delivered(100), Some(100));
        r.arrived(100).unwrap();
    }

    #[test]
    fn sender_and_receiver_agree_over_a_long_transfer() {
        let (mut send, mut recv) = (Credit::new(1000), Receive::new(1000));
        let mut moved = 0usize;
        let mut in_flight = 0u64;
        while moved < 1_000_000 {
            let n = send.take(333);
            if n > 0 {
                recv.arrived(n).unwrap();
                in_flight += n as u64;
                assert!(in_flight <= 1000);
            }
            // The receiver delivers everything it holds, granting as it goes.
            if let Some(g) = recv.delivered(usize::try_from(in_flight).unwrap()) {
                send.grant(g).unwrap();
            }
            moved += usize::try_from(in_flight).unwrap();
            in_flight = 0;
        }
    }

    proptest::proptest! {
        /// Whatever the sender wants to send and however late the receiver delivers, the
        /// bytes in flight never exceed the window, the receiver never refuses a sender
        /// that kept to its credit, and the transfer never stalls once everything is
        /// delivered.
        #[test]
        fn credit_holds_for_any_schedule(
            window in 1u32..200_000,
            steps in proptest::collection::vec((0usize..100_000, proptest::bool::ANY), 1..200),
        ) {
            let (mut send, mut recv) = (Credit::new(window), Receive::new(window));
            let mut held = 0u64; // arrived, not yet delivered onward
            for (want, deliver) in steps {
                let n = send.take(want);
                recv.arrived(n).unwrap();
                held += n as u64;
                proptest::prop_assert!(held <= u64::from(window));
                if deliver && held > 0 {
                    if let Some(g) = recv.delivered(usize::try_from(held).unwrap()) {
                        send.grant(g).unwrap();
                    }
                    held = 0;
                }
            }
            // Deliver the rest: the sender must get credit back to send again.
            if held > 0 && let Some(g) = recv.delivered(usize::try_from(held).unwrap()) {
                send.grant(g).unwrap();
            }
            proptest::prop_assert!(send.available() * 2 >= u64::from(window));
        }
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_eq(&[1, 2, 3], &[1, 2, 3]));
        assert!(!token_eq(&[1, 2, 3], &[1, 2, 4]));
        assert!(!token_eq(&[1, 2], &[1, 2, 3]));
    }

    #[test]
    fn allowlists_match_exact_addresses() {
        let list = vec!["127.0.0.1:22".to_owned()];
        assert!(allowed(&list, "127.0.0.1:22"));
        assert!(!allowed(&list, "127.0.0.1:23"));
        assert!(!allowed(&[], "127.0.0.1:22"));
    }

    #[test]
    fn frames_round_trip() {
        let open = Open {
            stream: 1,
            token: vec![7; TOKEN_LEN],
            remote: "127.0.0.1:22".into(),
            window: DEFAULT_WINDOW,
            idle_timeout_ms: 1000,
            actor: "ops".into(),
        };
        assert_eq!(from_bus::<Open>(&to_bus(&open).unwrap()).unwrap(), open);
        let close = Close {
            stream: 1,
            token: vec![7; TOKEN_LEN],
            reason: CloseReason::NotAllowed,
            detail: "x".into(),
        };
        assert_eq!(from_bus::<Close>(&to_bus(&close).unwrap()).unwrap(), close);
        for r in [OPEN, DATA, WINDOW, CLOSE, OPENED] {
            assert!(crate::Route::new(r).is_ok(), "{r}");
        }
    }
}
