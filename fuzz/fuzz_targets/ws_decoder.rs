//! The gateway's own RFC 6455 decoder (`ws_gateway::ws::Decoder`, ADR 0011), the first code
//! that touches a client's bytes after the upgrade: arbitrary input, cut into arbitrary
//! chunks, must never panic, must never yield a message above the limit, and must decode
//! the same messages however the bytes are chunked.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use ws_gateway::ws::{Decoder, Message};

const MAX: usize = 4096;

fn run(data: &[u8], cuts: &[usize]) -> (Vec<Message>, bool) {
    let mut decoder = Decoder::new(MAX);
    let mut out = VecDeque::new();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
        let end = cut.clamp(at, data.len());
        if decoder.feed(&data[at..end], &mut out).is_err() {
            return (out.into_iter().collect(), true);
        }
        at = end;
    }
    (out.into_iter().collect(), false)
}

fn size(m: &Message) -> usize {
    match m {
        Message::Binary(b) | Message::Ping(b) => b.len(),
        Message::Text | Message::Pong | Message::Close(_) => 0,
    }
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks the chunking; the rest is the stream.
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let step = usize::from(seed % 17) + 1;
    let cuts: Vec<usize> = (step..data.len()).step_by(step).collect();
    let (whole, whole_err) = run(data, &[]);
    let (chunked, chunked_err) = run(data, &cuts);
    for m in whole.iter().chain(chunked.iter()) {
        assert!(size(m) <= MAX, "a message above the limit was delivered");
    }
    assert_eq!(whole_err, chunked_err, "chunking changed the verdict");
    if !whole_err {
        assert_eq!(whole, chunked, "chunking changed the messages");
    }
});
