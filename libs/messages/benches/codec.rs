//! Hot paths of the wire contract: frame decode (header only) and encode, Snowflake ids, and
//! signing and verifying agent commands.
//! Figures go in docs/benchmarks.md with the command that produced them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use messages::frame::encode_parts;
use messages::snowflake::SystemClock;
use messages::{BodyCodec, Flags, Frame, FrameKind, Limits, Route, Snowflake, TraceContext};

fn frame(body_len: usize, traced: bool) -> Frame {
    let trace = traced.then_some(TraceContext {
        trace_id: [7; 16],
        span_id: [9; 8],
        flags: 1,
    });
    Frame::new(FrameKind::Publish)
        .with_msg_id(42)
        .with_route(Route::new("chat.room.send").unwrap())
        .with_body(BodyCodec::MsgPack, vec![0xa5; body_len])
        .with_trace(trace)
}

fn codec(c: &mut Criterion) {
    let limits = Limits {
        max_body_len: 1 << 20,
        ..Limits::default()
    };
    let mut group = c.benchmark_group("frame");
    for &len in &[16usize, 1024, 65_536] {
        let encoded = frame(len, true).encode();
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("decode", len), &encoded, |b, encoded| {
            b.iter(|| Frame::decode(black_box(encoded), &limits).unwrap());
        });
        let f = frame(len, true);
        group.bench_with_input(BenchmarkId::new("encode", len), &f, |b, f| {
            b.iter(|| black_box(f.encode()));
        });
        let body = Bytes::from(vec![0xa5; len]);
        let route = Route::new("chat.room.send").unwrap();
        group.bench_with_input(
            BenchmarkId::new("encode_parts_reuse", len),
            &body,
            |b, body| {
                let mut buf = BytesMut::with_capacity(len + 64);
                b.iter(|| {
                    encode_parts(
                        &mut buf,
                        FrameKind::Push,
                        Flags::new(BodyCodec::MsgPack),
                        7,
                        None,
                        &route,
                        body,
                    );
                    black_box(buf.split().freeze())
                });
            },
        );
    }
    group.finish();
}

fn ids(c: &mut Criterion) {
    // Criterion mints far more than 4096 ids per millisecond, which runs the logical clock
    // ahead of the wall clock; allow a large lead so the bench measures the call itself.
    let ids = Snowflake::with_clock(1, SystemClock, Duration::from_secs(86_400)).unwrap();
    c.bench_function("snowflake/next_id", |b| {
        b.iter(|| black_box(ids.next_id().unwrap()));
    });
}

/// What signing costs the scheduler per push and verifying costs an agent: a task body of
/// about 100 bytes, as a fan-out sends it.
fn commands(c: &mut Criterion) {
    use messages::command::{CommandSigner, CommandVerifier};
    let signer = CommandSigner::generate();
    let verifier = CommandVerifier::new([signer.verifying_key()]);
    let task = vec![0x42u8; 100];
    let now = 1_800_000_000_000;
    let mut group = c.benchmark_group("command");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign", |b| {
        b.iter(|| {
            signer
                .sign(
                    "edge-1",
                    "agent.task",
                    black_box(task.clone()),
                    now,
                    600_000,
                )
                .unwrap()
        });
    });
    let (body, _) = signer
        .sign("edge-1", "agent.task", task.clone(), now, 600_000)
        .unwrap();
    group.bench_function("verify", |b| {
        b.iter(|| {
            verifier
                .verify(black_box(&body), "edge-1", "agent.task", now)
                .unwrap()
        });
    });
    group.finish();
}

criterion_group!(benches, codec, ids, commands);
criterion_main!(benches);
