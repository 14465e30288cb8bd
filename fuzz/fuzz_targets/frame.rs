//! The client frame decoder (`messages::Frame`, protocol section 2): arbitrary bytes must
//! never panic, whatever it accepts must re-encode to exactly the input, and the header
//! parser alone must agree with the full decoder.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use messages::frame::MAX_ROUTE_LEN;
use messages::{Frame, FrameHeader, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_route_len: MAX_ROUTE_LEN,
        max_body_len: 1 << 20,
    };
    let buf = Bytes::copy_from_slice(data);
    let header = FrameHeader::parse(data, &limits);
    match Frame::decode(&buf, &limits) {
        Ok(frame) => {
            assert!(header.is_ok(), "decode accepted what parse refused");
            assert_eq!(&frame.encode()[..], data);
        }
        Err(_) => {}
    }
    // Tight limits only ever refuse more.
    let tight = Limits {
        max_route_len: 8,
        max_body_len: 16,
    };
    if Frame::decode(&buf, &tight).is_ok() {
        assert!(Frame::decode(&buf, &limits).is_ok());
    }
});
