//! Property tests for the frame codec: every well-formed frame survives a round trip, and
//! no byte string makes the decoder panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use messages::frame::{FIXED_HEADER_LEN, MAX_ROUTE_LEN};
use messages::{BodyCodec, Flags, Frame, FrameKind, Limits, Route, TraceContext};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = FrameKind> {
    proptest::sample::select(FrameKind::ALL.to_vec())
}

fn codec() -> impl Strategy<Value = BodyCodec> {
    prop_oneof![
        Just(BodyCodec::Raw),
        Just(BodyCodec::MsgPack),
        Just(BodyCodec::Json)
    ]
}

fn route() -> impl Strategy<Value = Route> {
    proptest::collection::vec("[A-Za-z0-9_:@=+-]{1,12}", 0..6)
        .prop_map(|tokens| tokens.join("."))
        .prop_filter("fits the length byte", |r| r.len() <= MAX_ROUTE_LEN)
        .prop_map(|r| Route::new(&r).expect("strategy makes valid routes"))
}

fn trace() -> impl Strategy<Value = Option<TraceContext>> {
    proptest::option::of(
        (any::<[u8; 16]>(), any::<[u8; 8]>(), any::<u8>())
            .prop_filter_map("ids must not be all zero", |(t, s, f)| {
                TraceContext::from_binary(&[&t[..], &s[..], &[f]].concat())
            }),
    )
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        kind(),
        codec(),
        any::<bool>(),
        any::<u64>(),
        trace(),
        route(),
        proptest::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(
            |(kind, codec, compressed, msg_id, trace, route, body)| Frame {
                kind,
                flags: Flags::new(codec).with_compressed(compressed),
                msg_id,
                trace,
                position: None,
                route,
                body: Bytes::from(body),
            },
        )
}

fn roomy() -> Limits {
    Limits {
        max_route_len: MAX_ROUTE_LEN,
        max_body_len: 1 << 20,
    }
}

proptest! {
    #[test]
    fn round_trip(frame in frame()) {
        let bytes = frame.encode();
        prop_assert_eq!(bytes.len(), frame.encoded_len());
        let decoded = Frame::decode(&bytes, &roomy()).unwrap();
        prop_assert_eq!(decoded, frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(&Bytes::from(bytes), &Limits::default());
    }

    #[test]
    fn mutated_frames_never_panic(
        frame in frame(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = frame.encode().to_vec();
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = Frame::decode(&Bytes::from(bytes), &Limits::default());
    }

    #[test]
    fn header_bytes_are_valid_or_rejected_with_a_typed_error(
        header in proptest::collection::vec(any::<u8>(), FIXED_HEADER_LEN..FIXED_HEADER_LEN + 40)
    ) {
        match Frame::decode(&Bytes::from(header.clone()), &roomy()) {
            Ok(frame) => prop_assert_eq!(frame.encode(), Bytes::from(header)),
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }
}
