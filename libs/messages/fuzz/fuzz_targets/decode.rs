//! Feeds arbitrary bytes to the frame decoder. It must never panic, and whatever it accepts
//! must re-encode to exactly the input.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use messages::frame::MAX_ROUTE_LEN;
use messages::{Frame, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_route_len: MAX_ROUTE_LEN, max_body_len: 1 << 20 };
    if let Ok(frame) = Frame::decode(&Bytes::copy_from_slice(data), &limits) {
        assert_eq!(&frame.encode()[..], data);
    }
});
