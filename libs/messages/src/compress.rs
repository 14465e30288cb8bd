//! End-to-end body compression: raw DEFLATE (RFC 1951, no zlib or gzip wrapper), as the
//! frame's compressed flag and the `ws-compressed` header declare. Only the two endpoints
//! touch a compressed body; gateways and the bus pass it through.
//!
//! Inflation is always bounded: a receiver states the largest body it accepts, so a small
//! malicious frame cannot expand into gigabytes.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;

/// Bodies at least this large are worth compressing (smaller ones rarely shrink enough to
/// pay for the work at both ends).
pub const WORTH_COMPRESSING: usize = 1024;

/// Why a body could not be inflated.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// Not a valid DEFLATE stream.
    #[error("not a valid DEFLATE body: {0}")]
    Corrupt(#[from] std::io::Error),
    /// It inflates beyond the receiver's limit.
    #[error("body inflates beyond {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
}

/// Compresses `body` with raw DEFLATE at the default level.
pub fn deflate(body: &[u8]) -> Vec<u8> {
    let mut encoder =
        DeflateEncoder::new(Vec::with_capacity(body.len() / 2), Compression::default());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

/// Compresses `body` if it is large enough and actually shrinks; `None` means send it as is.
pub fn deflate_if_worth_it(body: &[u8]) -> Option<Vec<u8>> {
    if body.len() < WORTH_COMPRESSING {
        return None;
    }
    let packed = deflate(body);
    (packed.len() < body.len()).then_some(packed)
}

/// Inflates a raw DEFLATE body, refusing to produce more than `max` bytes.
pub fn inflate(body: &[u8], max: usize) -> Result<Vec<u8>, CompressError> {
    let mut out = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    DeflateDecoder::new(body)
        .take(limit)
        .read_to_end(&mut out)?;
    if out.len() > max {
        return Err(CompressError::TooLarge { max });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_shrinks_repetitive_bodies() {
        let body = b"cpu_pct=12.5 mem_pct=40.1 ".repeat(200);
        let packed = deflate_if_worth_it(&body).unwrap();
        assert!(
            packed.len() < body.len() / 5,
            "{} -> {}",
            body.len(),
            packed.len()
        );
        assert_eq!(inflate(&packed, body.len()).unwrap(), body);
        assert!(deflate_if_worth_it(b"short").is_none());
    }

    #[test]
    fn inflation_is_bounded_and_garbage_is_an_error() {
        let bomb = deflate(&vec![0u8; 10 << 20]);
        assert!(bomb.len() < 20_000);
        assert!(
            matches!(inflate(&bomb, 1 << 20), Err(CompressError::TooLarge { max }) if max == 1 << 20)
        );
        assert!(matches!(
            inflate(b"\xff\xfe\xfd not deflate", 1024),
            Err(CompressError::Corrupt(_))
        ));
    }
}
