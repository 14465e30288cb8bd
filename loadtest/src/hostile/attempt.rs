//! One attempt of one hostile or stalled client: connect, misbehave, and watch how the
//! gateway ends the connection.

use std::time::{Duration, Instant};

use messages::{BodyCodec, Frame, FrameKind, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::wire::{self, op};
use super::{Ctx, Kind, Outcome};

/// A hostile client not cut this long after it started misbehaving counts as `not cut`.
const CUT_WITHIN: Duration = Duration::from_secs(20);
/// How often a stalled client sends a heartbeat (its only way to notice the cut: a write
/// to a socket the gateway closed fails).
const STALLED_BEAT: Duration = Duration::from_secs(1);

/// Runs attempt `n` of `slot`.
pub(super) async fn run(ctx: &Ctx, slot: usize, kind: Kind, n: u64) -> Outcome {
    match kind {
        Kind::Stalled => stalled(ctx, slot).await,
        Kind::Slowloris => slowloris(ctx, slot).await,
        _ => misbehave(ctx, slot, kind, n).await,
    }
}

/// Connects and upgrades; `Err` is the outcome when that fails.
async fn open(
    ctx: &Ctx,
    slot: usize,
    rcvbuf: Option<u32>,
) -> Result<(TcpStream, Vec<u8>), Outcome> {
    let connect = async {
        let mut s = wire::tcp(&ctx.target, ctx.source(slot), rcvbuf).await?;
        let (status, rest) = wire::upgrade(&mut s, &ctx.target, &ctx.token(slot)).await?;
        Ok::<_, crate::client::BoxError>((s, status, rest))
    };
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((s, 101, rest))) => Ok((s, rest)),
        Ok(Ok((_, status, _))) => Err(Outcome::new(format!("refused http {status}"), None)),
        Ok(Err(_)) | Err(_) => Err(Outcome::new("connect error", None)),
    }
}

/// The bytes a misbehaving writer sends, and how.
async fn write_misbehaviour(mut w: OwnedWriteHalf, kind: Kind, n: u64, ping_rate: u32) {
    let _ = match kind {
        Kind::Garbage => garbage(&mut w, n).await,
        Kind::Oversized if n.is_multiple_of(2) => announced_mib(&mut w).await,
        Kind::Oversized => w.write_all(&body_over_limit()).await,
        Kind::BadFrame => w.write_all(&bad_frame(n)).await,
        Kind::Text => {
            w.write_all(&wire::client_frame(op::TEXT, b"hello", None))
                .await
        }
        Kind::PingFlood => ping_flood(&mut w, ping_rate).await,
        Kind::Stalled | Kind::Slowloris => Ok(()),
    };
    // Hold the write side open: the gateway, not the client, must end the connection.
    std::future::pending::<()>().await;
}

/// A hostile client: misbehave from the welcome on, read until the gateway closes.
async fn misbehave(ctx: &Ctx, slot: usize, kind: Kind, n: u64) -> Outcome {
    let (stream, rest) = match open(ctx, slot, None).await {
        Ok(ok) => ok,
        Err(outcome) => return outcome,
    };
    let (r, w) = stream.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(write_misbehaviour(w, kind, n, ctx.args.ping_rate));
    let outcome = watch_close(r, rest, started, CUT_WITHIN.min(ctx.left())).await;
    writer.abort();
    outcome
}

/// Reads server frames until a close frame, EOF, a reset or `limit`.
async fn watch_close(
    mut r: OwnedReadHalf,
    mut buf: Vec<u8>,
    started: Instant,
    limit: Duration,
) -> Outcome {
    let read = async {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            for frame in wire::drain_frames(&mut buf) {
                if frame.opcode == op::CLOSE {
                    let code = frame.close_code().unwrap_or(1005);
                    return Outcome::new(format!("close {code}"), Some(started.elapsed()));
                }
            }
            match r.read(&mut chunk).await {
                Ok(0) => return Outcome::new("eof", Some(started.elapsed())),
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(_) => return Outcome::new("reset", Some(started.elapsed())),
            }
        }
    };
    match tokio::time::timeout(limit, read).await {
        Ok(outcome) => outcome,
        Err(_) if limit < CUT_WITHIN => Outcome::new("open at the end", None),
        Err(_) => Outcome::new("not cut", None),
    }
}

/// Random bytes (xorshift), 1 KiB every 100 ms, so that whatever frame header they happen
/// to spell is followed by enough bytes to break it.
async fn garbage(w: &mut OwnedWriteHalf, n: u64) -> std::io::Result<()> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ n.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 1;
    loop {
        let bytes: Vec<u8> = (0..1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        w.write_all(&bytes).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A binary message announcing 1 MiB, then the bytes, 64 KiB every 10 ms.
async fn announced_mib(w: &mut OwnedWriteHalf) -> std::io::Result<()> {
    let header = wire::client_frame(op::BINARY, &[], Some(1 << 20));
    w.write_all(&header).await?;
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..16 {
        w.write_all(&chunk).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A publish frame whose body is one byte over the default 64 KiB limit, in a message that
/// is still under the whole-frame limit (so the frame decoder, not the WebSocket layer,
/// refuses it).
fn body_over_limit() -> Vec<u8> {
    let route = Route::new("chat.send").unwrap_or_default();
    let frame = Frame::new(FrameKind::Publish)
        .with_msg_id(1)
        .with_route(route)
        .with_body(BodyCodec::Raw, vec![0u8; 65_537]);
    wire::client_frame(op::BINARY, &frame.encode(), None)
}

/// A heartbeat frame made undecodable: an unknown kind, reserved flag bits, or version 9.
fn bad_frame(n: u64) -> Vec<u8> {
    let mut bytes = Frame::new(FrameKind::Heartbeat).encode().to_vec();
    match n % 3 {
        0 => bytes[1] = 0xEE,
        1 => bytes[2] |= 0x80,
        _ => bytes[0] = 9,
    }
    wire::client_frame(op::BINARY, &bytes, None)
}

/// Pings at `rate` per second, in 10 ms batches.
async fn ping_flood(w: &mut OwnedWriteHalf, rate: u32) -> std::io::Result<()> {
    let per_batch = (rate / 100).max(1) as usize;
    let ping = wire::client_frame(op::PING, b"flood123", None);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * per_batch)
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        w.write_all(&batch).await?;
    }
}

/// A client that stops reading: a small receive buffer, a heartbeat every second (so the
/// heartbeat timeout cannot be what cuts it), nothing read after the upgrade. The cut shows
/// as a failed write; whatever is left in the socket is then read for a close frame.
async fn stalled(ctx: &Ctx, slot: usize) -> Outcome {
    let (stream, _) = match open(ctx, slot, Some(ctx.args.stalled_rcvbuf)).await {
        Ok(ok) => ok,
        Err(outcome) => return outcome,
    };
    let (r, mut w) = stream.into_split();
    let started = Instant::now();
    let beat = wire::client_frame(op::BINARY, &Frame::new(FrameKind::Heartbeat).encode(), None);
    loop {
        if ctx.left() < Duration::from_secs(1) {
            return Outcome::new("open at the end", None);
        }
        if w.write_all(&beat).await.is_err() {
            break;
        }
        tokio::time::sleep(STALLED_BEAT).await;
    }
    let cut_after = started.elapsed();
    let mut seen = watch_close(r, Vec::new(), started, Duration::from_secs(2)).await;
    if seen.key == "open at the end" {
        seen.key = "reset".to_owned();
    }
    seen.cut_after = Some(cut_after);
    seen
}

/// The upgrade request one byte every 500 ms; the outcome is what the gateway answers or
/// how it closes.
async fn slowloris(ctx: &Ctx, slot: usize) -> Outcome {
    let Ok(stream) = wire::tcp(&ctx.target, ctx.source(slot), None).await else {
        return Outcome::new("connect error", None);
    };
    let (mut r, mut w) = stream.into_split();
    let request = wire::upgrade_request(&ctx.target, &ctx.token(slot));
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for b in request {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        std::future::pending::<()>().await;
    });
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) if buf.is_empty() => return "eof".to_owned(),
                Ok(0) => break,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(_) => return "reset".to_owned(),
            }
            if wire::find_head_end(&buf).is_some() {
                break;
            }
        }
        wire::status_of(&buf).map_or("eof".to_owned(), |s| format!("http {s}"))
    };
    let outcome = match tokio::time::timeout(CUT_WITHIN.min(ctx.left()), read).await {
        Ok(key) => Outcome::new(key, Some(started.elapsed())),
        Err(_) if ctx.left() < Duration::from_secs(1) => Outcome::new("open at the end", None),
        Err(_) => Outcome::new("not cut", None),
    };
    writer.abort();
    outcome
}
