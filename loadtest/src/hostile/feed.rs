//! What makes a stalled client's backlog grow: pushes to each stalled user published
//! straight on the bus (its user subject), and the machine's TCP buffer memory sampled
//! meanwhile. At a broadcast's few KB per second a stalled client's unread bytes sit in
//! the kernel's socket buffers (up to `tcp_wmem`'s maximum, 4 MiB here) for many minutes
//! before the gateway's write blocks; the feed makes the cut happen within a run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use messages::envelope::PushEnvelope;
use messages::{BodyCodec, Route, UserId};

use super::Ctx;
use crate::client::BoxError;

/// Publishes `bytes` to every stalled user every `every`, until the run's deadline.
pub(super) async fn stalled_users(
    ctx: Arc<Ctx>,
    nats_url: String,
    bytes: usize,
    every: Duration,
) -> Result<u64, BoxError> {
    let nc = async_nats::connect(&nats_url).await?;
    let subjects: Vec<String> = (0..ctx.args.stalled)
        .map(|slot| UserId::new(format!("hostile-{slot}")).map(|u| messages::subject::user(&u)))
        .collect::<Result<_, _>>()?;
    let route = Route::new("bench.stalled")?;
    let body = Bytes::from(vec![b's'; bytes]);
    let mut tick = tokio::time::interval(every);
    let mut sent = 0u64;
    while ctx.left() > Duration::from_secs(1) {
        tick.tick().await;
        for subject in &subjects {
            sent += 1;
            let push = PushEnvelope::new(sent, route.clone(), BodyCodec::Raw);
            nc.publish_with_headers(subject.clone(), push.to_headers(), body.clone())
                .await?;
        }
        nc.flush().await?;
    }
    Ok(sent)
}

/// The machine's TCP buffer memory in KiB (`/proc/net/sockstat`, `TCP: ... mem <pages>`).
pub(super) fn tcp_mem_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mem")?;
    let pages: u64 = words.next()?.parse().ok()?;
    Some(pages * 4)
}

/// Samples [`tcp_mem_kib`] every second into `max` until the run's deadline.
pub(super) async fn sample_tcp_mem(ctx: Arc<Ctx>, max: Arc<AtomicU64>) {
    while ctx.left() > Duration::ZERO {
        if let Some(kib) = tcp_mem_kib() {
            max.fetch_max(kib, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
